"""The data stage: source -> checked rows -> split -> tokenized windows -> Parquet shards.

Every step is a Ray Data transform, so the same job runs on a laptop and on a cluster. Rows
(source files) are conserved: each is kept or quarantined with a reason, and the manifest
records ``rows_in == rows_kept + rows_rejected``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from bigopt.data.text import list_files, read_and_check, resolve_root, to_windows
from bigopt.runtime import RunDir
from bigopt.spec import JobSpec, SplitSpec

log = logging.getLogger("bigopt")

SPLITS = ("train", "val", "test")


def assign_split(key: str, split: SplitSpec) -> str:
    """Deterministic split of one row from its key: independent of row order and of workers."""
    digest = hashlib.blake2b(f"{split.seed}:{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < split.test:
        return "test"
    if u < split.test + split.val:
        return "val"
    return "train"


@dataclass(frozen=True)
class DataResult:
    manifest: dict[str, Any]
    data_uri: str


def _add_split(batch: dict[str, np.ndarray], split: SplitSpec) -> dict[str, np.ndarray]:
    batch["split"] = np.array([assign_split(str(k), split) for k in batch[split.key]], dtype=object)
    return batch


def _shards(run: RunDir, rel_dir: str) -> list[dict[str, Any]]:
    fs, shards = run.fs, []
    for rel in run.list(rel_dir):
        if not rel.endswith(".parquet"):
            continue
        with fs.open_input_file(run.sub(rel)) as f:
            meta = pq.ParquetFile(f).metadata
        shards.append({"path": rel, "rows": meta.num_rows, "bytes": fs.get_file_info(run.sub(rel)).size})
    return shards


def run_data(spec: JobSpec, run: RunDir) -> DataResult:
    """Run the data stage into ``run``/data and return its manifest."""
    import ray

    assert spec.data is not None and spec.context is not None
    src, context, started = spec.data.source, spec.context, time.time()
    root = resolve_root(src.path)
    files = list_files(root, src.include, src.exclude, src.max_files)
    if not files:
        raise FileNotFoundError(f"data.source: no files under {root} match {src.include}")
    log.info("data: %d files under %s", len(files), root)

    rows = ray.data.from_items([{"path": f} for f in files], override_num_blocks=min(len(files), 32))
    checked = rows.map_batches(
        read_and_check, fn_kwargs={"root": str(root), "max_bytes": src.max_file_bytes},
        batch_size=32,
    ).materialize()
    rejected = checked.filter(lambda r: r["reject_reason"] != "").drop_columns(["text"])
    kept = checked.filter(lambda r: r["reject_reason"] == "").drop_columns(["reject_reason"])
    kept = kept.map_batches(_add_split, fn_kwargs={"split": spec.data.split}, batch_size=256)
    windows = kept.map_batches(to_windows, fn_kwargs={"context": context}, batch_size=8)
    windows = windows.materialize()

    fs = run.fs
    per_split: dict[str, dict[str, Any]] = {}
    for name in SPLITS:
        part = windows.filter(lambda r, name=name: r["split"] == name).drop_columns(["split"])
        n = part.count()
        if n == 0:
            continue
        part.write_parquet(run.sub(f"data/{name}"), filesystem=fs,
                           min_rows_per_file=spec.data.rows_per_shard)
        per_split[name] = {
            "rows": n,
            "tokens": int(part.sum("n_tokens")),
            "files": len(set(part.unique("path"))),
            "shards": _shards(run, f"data/{name}"),
        }
    reject_rows = rejected.take_all()
    reasons: dict[str, int] = {}
    for r in reject_rows:
        kind = r["reject_reason"].split(":")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    if reject_rows:
        run.write_text("data/quarantine.jsonl", "".join(
            json.dumps({"path": r["path"], "reason": r["reject_reason"]}) + "\n"
            for r in reject_rows
        ))
    rows_kept = len(files) - len(reject_rows)
    manifest = {
        "source": {"kind": src.kind, "root": str(root), "include": src.include},
        "tokenizer": {"kind": spec.data.tokenizer, "vocab_size": 256},
        "context": context,
        "rows_in": len(files),
        "rows_kept": rows_kept,
        "rows_rejected": len(reject_rows),
        "rejected_by_reason": reasons,
        "split": spec.data.split.model_dump(),
        "splits": per_split,
        "seconds": round(time.time() - started, 2),
    }
    assert manifest["rows_in"] == rows_kept + len(reject_rows)
    run.write_json("data/manifest.json", manifest)
    log.info(
        "data: %d files kept, %d quarantined; windows %s",
        rows_kept, len(reject_rows), {k: v["rows"] for k, v in per_split.items()},
    )
    return DataResult(manifest=manifest, data_uri=run.uri_of("data"))
