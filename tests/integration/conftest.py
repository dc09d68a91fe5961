"""Make ``ray_helpers`` (next to this file) importable from the test modules here.

The project runs pytest with ``--import-mode=importlib``, which puts no test directory on
``sys.path``; conftest files load before their directory's test modules are collected.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
