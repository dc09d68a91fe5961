"""The quiet console: bigopt's lines on the terminal, everything else (other loggers, warnings,
C-level writes to fds 1 and 2) in <run>/logs/driver.log."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import logging, os, sys, warnings
logging.basicConfig(level=logging.INFO, format="%(message)s")
from bigopt.console import quiet_console
from bigopt.runtime import RunDir
with quiet_console(RunDir(sys.argv[1])):
    logging.getLogger("bigopt").info("bigopt says hello")
    logging.getLogger("ray.data").info("ray data executor line")
    warnings.warn("a deprecation somewhere", DeprecationWarning)
    os.write(2, b"a C++ library writes to fd 2\n")
    print("a stray print")
logging.getLogger("bigopt").info("after the run")
"""


def test_only_bigopt_lines_reach_the_console(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    console = proc.stdout + proc.stderr
    assert "bigopt says hello" in console and "after the run" in console
    for noise in ("ray data executor line", "a deprecation somewhere", "C++ library", "stray print"):
        assert noise not in console, console
    log = (tmp_path / "logs" / "driver.log").read_text()
    for line in ("ray data executor line", "a deprecation somewhere", "C++ library", "stray print",
                 "bigopt says hello"):
        assert line in log, log
