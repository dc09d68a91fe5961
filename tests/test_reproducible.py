"""Fresh runs from raw data, through the CLI as a user types it: the same spec and seed give
the same shards and the same loss curve, and every strategy starts from the same batch.

Each run prepares its own data (no shared prepared data set, which would hide a data stage
that writes different shards each time)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

STEPS = 8
COMMON = ["--set", "data.source.max_files=40", "--set", f"train.max_steps={STEPS}",
          "--set", "train.precision=fp32", "--set", "train.seed=0", "--set", "train.log_every=1",
          "--set", "train.eval_every=1000", "--set", "train.checkpoint_every=1000",
          "--set", "train.batch_size=8"]


def cli_run(repo_root, storage, *overrides) -> dict[int, float]:
    cmd = [sys.executable, "-m", "bigopt.cli", "run", "jobs/quickstart.yaml",
           "--set", f"storage={storage}", *COMMON, *overrides]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (metrics,) = glob.glob(os.path.join(storage, "quickstart", "*", "train", "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in map(json.loads, open(metrics))}


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(a)


def test_fresh_runs_reproduce_and_strategies_start_alike(ray_session, repo_root, tmp_path):
    zero2 = cli_run(repo_root, tmp_path / "a")  # the quickstart's own ZeRO-2, default order
    (run_a,) = glob.glob(os.path.join(tmp_path / "a", "quickstart", "*"))
    # the second run's report sets it beside the first (report.compare_with, a run dir)
    again = cli_run(repo_root, tmp_path / "b", "--set", f"report.compare_with=['{run_a}']")
    assert sorted(zero2) == list(range(1, STEPS + 1))
    worst = max(rel(zero2[s], again[s]) for s in zero2)
    assert worst <= 1e-6, f"two runs of the same spec and seed differ by {worst:.2e}"
    (run_b,) = glob.glob(os.path.join(tmp_path / "b", "quickstart", "*"))
    report = open(os.path.join(run_b, "report.md")).read().split("## Compared with")[1]
    val_a = json.load(open(os.path.join(run_a, "train", "artifact.json")))["metrics"]["val_loss"]
    assert f"against quickstart's {val_a:.4f}" in report, report
    assert "on the same prepared data" in report, report
    timing = json.load(open(os.path.join(run_a, "run.json")))
    assert set(timing["stage_s"]) == {"data", "train"} and timing["wall_s"] > timing["stage_s"]["train"]
    assert f"| quickstart `{os.path.basename(run_a)}` |" in report
    # each of the 2 data-parallel ranks reads about half the split, not all of it
    (result,) = glob.glob(os.path.join(tmp_path / "a", "quickstart", "*", "train", "result.json"))
    ingest = json.load(open(result))["ingest"]
    assert sum(ingest["rows_used_by_rank"]) <= ingest["split_rows"], ingest
    assert all(r <= 0.6 * ingest["split_rows"] for r in ingest["rows_read_by_rank"]), ingest
    zero0 = cli_run(repo_root, tmp_path / "z0", "--set", "train.zero.stage=0")
    zero3 = cli_run(repo_root, tmp_path / "z3", "--set", "train.zero.stage=3")
    ddp = cli_run(repo_root, tmp_path / "ddp", "--set", "train.strategy=ddp")
    # step 1's loss is the first forward pass, before any update: the same batch everywhere
    for name, run in (("zero0", zero0), ("zero3", zero3), ("ddp", ddp)):
        assert rel(zero2[1], run[1]) <= 1e-6, (name, zero2[1], run[1])
    for name, run in (("zero0", zero0), ("zero3", zero3)):
        worst = max(rel(zero2[s], run[s]) for s in zero2)
        assert worst <= 1e-4, f"ZeRO-2 and {name} trajectories differ by {worst:.2e}"
