"""README's two set-up commands stay true: CI runs exactly the README's test command."""

from __future__ import annotations

import os
import re


def test_ci_runs_the_readme_test_command(repo_root):
    readme = open(os.path.join(repo_root, "README.md")).read()
    commands = re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", readme)
    assert len(commands) == 2, "README needs exactly two set-up commands"
    quickstart, tests = commands
    assert quickstart.endswith("bigopt run jobs/quickstart.yaml")
    ci = open(os.path.join(repo_root, ".ci", "run")).read()
    assert tests in ci.splitlines()
