"""The single-task text stage writes what the distributed stage writes: the same rows kept and
rejected, the same split of every file, the same windows in the same order."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from bigopt.data.prepare import run_data
from bigopt.resolve import resolve
from bigopt.runtime import RunDir

from factories import dirty_text_rows, make_spec, rejected_rows


def _shard_rows(run: RunDir, manifest: dict) -> dict[str, list[tuple]]:
    """Per split, every window's (path, window, n_tokens, first tokens) in shard order."""
    out = {}
    for name, split in manifest["splits"].items():
        rows = []
        for shard in split["shards"]:
            table = pq.read_table(run.fs.open_input_file(run.parent.sub(shard["path"])))
            rows += [(r["path"], r["window"], r["n_tokens"], tuple(r["input_ids"][:8]))
                     for r in table.to_pylist()]
        out[name] = rows
    return out


@pytest.mark.slow
def test_single_and_distributed_stages_write_the_same_rows(ray_session, tmp_path):
    src = tmp_path / "src"
    for row in dirty_text_rows(40):
        if row["reject_reason"]:
            continue  # unreadable files are a reader's matter; here every file reads
        path = src / row["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(row["text"])
    (src / "bad" / "nul.py").write_bytes(b"x = 1\x00\n")  # a read reject
    got = {}
    for engine in ("single", "distributed"):
        spec = make_spec(tmp_path / engine, name="s", train=None, data={
            "source": {"path": str(src), "max_files": None, "exclude": []}, "engine": engine,
            "split": {"val": 0.3}, "context": 32, "rows_per_shard": 500})
        run = RunDir.create(spec.storage, spec.name)
        manifest, _ = run_data(resolve(spec), run.stage("data"))
        assert {s["engine"] for s in manifest["steps"]} == {engine}
        rejected = sorted((r["path"], r["step"], r["reason"]) for r in rejected_rows(run))
        got[engine] = (manifest, rejected, _shard_rows(run.stage("data"), manifest))
    (single, s_rej, s_rows), (dist, d_rej, d_rows) = got["single"], got["distributed"]
    for manifest in (single, dist):  # what the driver held, recorded
        assert manifest["driver"]["peak_rss_mb"] > 0
        assert 0 < manifest["driver"]["largest_task_arg_bytes"] < 2**20
    for key in ("rows_in", "rows_kept", "rows_rejected", "rejected_by_reason", "fingerprint"):
        assert single[key] == dist[key], key
    assert s_rej == d_rej and {r[1] for r in s_rej} >= {"read", "exact_dedup", "near_dedup"}
    assert {n: (s["rows"], s["tokens"], s["files"]) for n, s in single["splits"].items()} == {
        n: (s["rows"], s["tokens"], s["files"]) for n, s in dist["splits"].items()}
    assert s_rows == d_rows  # same windows, same seeded order
