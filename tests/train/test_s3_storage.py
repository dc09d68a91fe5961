"""A whole run with storage on a real S3-protocol server: shards, metrics, checkpoints."""

from __future__ import annotations

import pytest

import bigopt
from bigopt.runtime import RunDir

from factories import make_spec

pytestmark = pytest.mark.slow


def test_run_with_s3_storage(ray_session, s3_server):
    spec = make_spec(f"{s3_server}/runs", name="s3run",
                     data={"source": {"max_files": 20}, "split": {"val": 0.2}},
                     model={"n_layer": 1},
                     train={"zero": {"stage": 2}, "precision": "bf16", "max_steps": 6,
                            "eval_batches": 1, "checkpoint_every": 3})
    run = RunDir(bigopt.run(spec).run_uri)
    assert run.uri.startswith("s3://")
    files = run.list("")
    manifest = run.read_json("data/manifest.json")
    assert manifest["rows_in"] == manifest["rows_kept"] + manifest["rows_rejected"] == 20
    assert any(f.startswith("data/train/") and f.endswith(".parquet") for f in files)
    assert [r["step"] for r in run.read_jsonl("train/metrics.jsonl")] == list(range(1, 7))
    for step in ("step_000003", "step_000006"):
        # bf16 ZeRO writes bf16_zero_pp_rank_<r>_*: one optimizer shard per rank
        assert any(f.startswith(f"train/checkpoints/{step}/state/") and "zero_pp_rank_1" in f
                   for f in files)
    assert "report.md" in files
