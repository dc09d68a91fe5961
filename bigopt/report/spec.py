"""The ``report`` section: what ``report.md`` sets this run beside.

    report:
      compare_with: [fmnist-cnn]          # a job name: its latest run under the same storage
      # or a run directory: /runs/fmnist-cnn/20261206-011643-ba8f4de5, s3://bucket/runs/...
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from bigopt.sections import Section as _Section

#: a job's ``name`` (the run-dir folder); anything with a ``/`` is a run directory instead
JOB_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class ReportSpec(_Section):
    compare_with: list[str] = Field(
        default_factory=list, max_length=8,
        description="Runs whose trained model report.md sets beside this run's (test metric, "
                    "parameters, wall time, whether the data was the same): a job name (its "
                    "latest run with a trained model under this job's storage) or a run "
                    "directory (path or s3:// URI).")

    @field_validator("compare_with")
    @classmethod
    def _names_or_run_dirs(cls, refs: list[str]) -> list[str]:
        for ref in refs:
            if not (JOB_NAME.match(ref) or "/" in ref):
                raise ValueError(f"{ref!r} is neither a job name ([A-Za-z0-9_.-]+) nor a run "
                                 "directory (a path or s3:// URI)")
        return refs
