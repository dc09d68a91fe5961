"""A whole run with storage on a real S3-protocol server: source, prepared-data cache, shards,
metrics, checkpoints, resume."""

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


def test_s3_end_to_end_source_cache_train_resume(ray_session, s3_server, tmp_path):
    """Source files on S3, storage on S3: the data stage publishes its cache entry there, a
    second run hits it, training reads the shards through the node cache (remote traffic
    counted), checkpoints to S3 and a later run resumes from the S3 checkpoint."""
    import pyarrow.fs as pafs

    from bigopt.runtime import filesystem_for

    src = f"{s3_server}/e2e-src"
    fs, base = filesystem_for(src)
    local = pafs.LocalFileSystem()
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    for name in ("abc.py", "bisect.py", "colorsys.py", "fnmatch.py", "glob.py", "heapq.py",
                 "keyword.py", "numbers.py", "shlex.py", "string.py", "textwrap.py", "this.py"):
        pafs.copy_files(f"{stdlib}/{name}", f"{base}/{name}", source_filesystem=local,
                        destination_filesystem=fs)
    spec = make_spec(f"{s3_server}/e2e", name="s3e2e",
                     data={"source": {"kind": "text_tree", "path": src}, "split": {"val": 0.2}},
                     model={"n_layer": 1},
                     train={"max_steps": 6, "eval_batches": 1, "checkpoint_every": 3})
    first = RunDir(bigopt.run(spec).run_uri)
    assert not first.read_json("data/cache.json")["hit"]
    result = first.read_json("train/result.json")
    remote = result["ingest"]["remote"]
    assert remote["node_cache"] and remote["gets"] + remote["hits"] > 0
    assert "step_000006" in {f.split("/")[2] for f in first.list("train/checkpoints")}
    # the same inputs again: the cache entry on S3 serves the data, training resumes from S3
    longer = make_spec(f"{s3_server}/e2e", name="s3e2e",
                       data={"source": {"kind": "text_tree", "path": src}, "split": {"val": 0.2}},
                       model={"n_layer": 1},
                       train={"max_steps": 9, "eval_batches": 1, "checkpoint_every": 3})
    again = RunDir(bigopt.run(longer, resume=first.uri_of("train/checkpoints/step_000006"),
                              trust_checkpoint=True).run_uri)
    assert again.read_json("data/cache.json")["hit"]
    resumed = again.read_json("train/result.json")
    assert resumed["resumed_from"] == 6 and resumed["steps"] == 9
    assert [r["step"] for r in again.read_jsonl("train/metrics.jsonl")] == [7, 8, 9]
