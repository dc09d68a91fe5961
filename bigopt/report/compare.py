"""report.md's "Compared with" section: this run's trained model beside other runs' trained
models (``report.compare_with``), read from their run directories like the rest of the report.

A reference is a job name (its latest run with a trained model under the same storage, so a
search job can name the hand-written job it should beat) or a run directory. Each row gives
the model's test (else validation) metrics, its size, its steps and the wall time of its run,
and whether both were trained on the same prepared data (the data artifacts' fingerprints):
a test accuracy on other rows is not the same measurement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from bigopt.artifacts import DataArtifact, ModelArtifact, ancestor, has_artifact, read_artifact
from bigopt.report.spec import ReportSpec
from bigopt.runtime import RunDir

#: metrics the section sets side by side, in the order it prefers one as the headline
#: (name, label, "max" when higher is better, as a percentage)
METRICS: tuple[tuple[str, str, str, bool], ...] = (
    ("test_accuracy", "test accuracy", "max", True),
    ("test_loss", "test loss", "min", False),
    ("val_acc", "validation accuracy", "max", True),
    ("val_loss", "validation loss", "min", False),
)


@dataclass
class RunSummary:
    """What the comparison needs from one run directory."""

    run: RunDir
    job: str
    model: ModelArtifact
    data_fingerprint: str | None
    wall_s: float | None
    stage_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, run: RunDir) -> RunSummary:
        model = read_artifact(run, "train")
        assert isinstance(model, ModelArtifact)
        data = ancestor(model, "data")  # the data it was trained on; None: moved or deleted
        fingerprint = data.fingerprint if isinstance(data, DataArtifact) else None
        timing = run.read_json("run.json") if run.exists("run.json") else {}
        return cls(run, run.parent.name, model, fingerprint, timing.get("wall_s"),
                   timing.get("stage_s", {}))


def compare_with(run: RunDir) -> list[str]:
    """``report.compare_with`` of the spec recorded in ``run`` ([] when it has none)."""
    if not run.exists("spec.yaml"):
        return []
    raw = yaml.safe_load(run.read_text("spec.yaml")) or {}
    return ReportSpec.model_validate(raw.get("report") or {}).compare_with


def find_reference(run: RunDir, ref: str) -> RunDir | None:
    """The run directory ``ref`` names: a run dir itself, or the newest run of job ``ref``
    beside ``run`` (``<storage>/<ref>/<run-id>/``) that has a trained model; never ``run``."""
    if "/" in ref:
        where = RunDir(ref if "://" in ref else os.path.abspath(os.path.expanduser(ref)))
        return where if has_artifact(where, "train") else None
    jobs = RunDir(run.parent.parent.uri_of(ref))  # run ids start with their start time
    for run_id in reversed(jobs.folders()):
        candidate = jobs.stage(run_id)
        if candidate.uri.rstrip("/") != run.uri.rstrip("/") and has_artifact(candidate, "train"):
            return candidate
    return None


def _value(metric: str, value: float, percent: bool) -> str:
    return f"{100 * value:.2f} %" if percent else f"{value:.4f}"


def _seconds(summary: RunSummary) -> str:
    if summary.wall_s is None:
        return "not recorded"
    stages = ", ".join(f"{k} {v:.0f}" for k, v in summary.stage_s.items())
    return f"{summary.wall_s:.0f} s" + (f" ({stages})" if stages else "")


def headline(this: RunSummary, other: RunSummary) -> str | None:
    """One sentence on the first metric both models have, with its difference and who leads."""
    for metric, label, direction, percent in METRICS:
        a, b = this.model.metrics.get(metric), other.model.metrics.get(metric)
        if a is None or b is None:
            continue
        diff = a - b
        shown = f"{100 * diff:+.2f} points" if percent else f"{diff:+.4f}"
        ahead = (diff > 0) == (direction == "max")
        verdict = "level" if diff == 0 else ("this run is ahead" if ahead else f"{other.job} is ahead")
        return (f"**{label} {_value(metric, a, percent)} against {other.job}'s "
                f"{_value(metric, b, percent)}: {shown}** ({verdict})")
    return None


def _data_line(this: RunSummary, other: RunSummary) -> str:
    if this.data_fingerprint is None or other.data_fingerprint is None:
        return "the data fingerprint of one run is unknown: check that both used the same split"
    if this.data_fingerprint == other.data_fingerprint:
        return f"on the same prepared data (fingerprint `{this.data_fingerprint[:12]}`)"
    return (f"**on different data** (fingerprints `{this.data_fingerprint[:12]}` and "
            f"`{other.data_fingerprint[:12]}`): the metrics come from different rows")


def comparison_section(run: RunDir, refs: list[str]) -> list[str]:
    """The "Compared with" section for ``refs`` ([] when there is nothing to compare)."""
    if not refs or not has_artifact(run, "train"):
        return []
    this = RunSummary.of(run)
    lines = ["## Compared with", ""]
    found: list[RunSummary] = []
    for ref in refs:
        where = find_reference(run, ref)
        if where is None:
            place = ref if "/" in ref else run.parent.parent.uri_of(ref)
            lines.append(f"- `{ref}`: no run with a trained model at `{place}` yet; run it with "
                         f"this job's storage, then `bigopt report {run.uri}` adds it here")
            continue
        other = RunSummary.of(where)
        found.append(other)
        sentence = headline(this, other) or f"no metric in common with {other.job}"
        lines.append(f"- {sentence}, {_data_line(this, other)}; one run each: a single draw, "
                     "not a difference measured over seeds")
    if not found:
        return lines + [""]
    rows = [this, *found]
    shown = [m for m in METRICS if any(r.model.metrics.get(m[0]) is not None for r in rows)]
    lines += ["", "| run | " + " | ".join(m[1] for m in shown)
              + " | parameters | steps | wall time |",
              "|---" * (len(shown) + 4) + "|"]
    for i, summary in enumerate(rows):
        name = f"{summary.job} `{summary.run.name}`" + (" (this run)" if i == 0 else "")
        values = [_value(m, summary.model.metrics[m], pct) if summary.model.metrics.get(m)
                  is not None else "-" for m, _, _, pct in shown]
        params = f"{summary.model.params:,}" if summary.model.params else "-"
        lines.append(f"| {name} | " + " | ".join(values)
                     + f" | {params} | {summary.model.step} | {_seconds(summary)} |")
    return lines + [""]


def timing_record(previous: dict[str, Any] | None, wall_s: float,
                  stage_s: dict[str, float]) -> dict[str, Any]:
    """``run.json``: the wall time spent on this run dir (summed over resumed invocations) and
    each stage's own time (the latest time a stage ran)."""
    previous = previous or {}
    return {"wall_s": round(previous.get("wall_s", 0.0) + wall_s, 1),
            "stage_s": {**previous.get("stage_s", {}), **{k: round(v, 1) for k, v in stage_s.items()}}}
