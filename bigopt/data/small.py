"""The text data stage for inputs the engine rule calls small (``bigopt.data.engine``): read,
then (after the cleaning steps, one task each) split, tokenize, order and write the shards,
each in one Ray task over one Arrow table.

The functions are the distributed path's own per-batch functions (``read_and_check``,
``add_split``, ``to_windows``, ``_add_order_key``) applied to the whole input as one batch, so
the rows, their split, their windows and their order are the same; only the shard boundaries
are cut here (evenly, in the sorted order) instead of by Ray Data's ``repartition``. What
this saves on 2 cores is Ray Data's fixed cost per operator (a second or more each: read,
materialize, filter per split, sort, repartition, write), which on a few MB of text is most
of the stage (BENCHMARKS 7a).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from bigopt.data.digest import digest_of
from bigopt.data.engine import as_batch, concat, submit

SPLITS = ("train", "val", "test")


def read_files(files: list[str], root: str, max_bytes: int) -> tuple[Any, str]:
    """Ray task body: the text tree's files as one table ``{path, text, reject_reason}``, and
    the content digest of what was read (``bigopt.data.digest``, as the distributed path's)."""
    import pyarrow as pa

    from bigopt.data.text import read_and_check

    batch = read_and_check({"path": np.array(files, dtype=object)}, root=root, max_bytes=max_bytes)
    table = pa.table({"path": pa.array(list(batch["path"]), pa.string()),
                      "text": pa.array(list(batch["text"]), pa.binary()),
                      "reject_reason": pa.array(list(batch["reject_reason"]), pa.string())})
    return table, digest_of(batch["path"], batch["text"])


def _write_split(part: dict[str, np.ndarray], run: Any, name: str, rows_per_shard: int,
                 ) -> list[dict[str, Any]]:
    """One split's rows (already in their final order) as ``<split>-NNNNN.parquet`` shards of
    at most ``rows_per_shard`` rows, cut evenly; returns the manifest's shard list."""
    import pyarrow.parquet as pq
    from ray.data.block import BlockAccessor

    from bigopt.data.partition import row_group_rows

    n = len(next(iter(part.values())))
    fs, where = run.fs, run.sub(name)
    fs.create_dir(where, recursive=True)
    fs.delete_dir_contents(where, missing_dir_ok=True)  # a rerun replaces its shards
    shards = []
    for i, rows in enumerate(np.array_split(np.arange(n), max(1, math.ceil(n / rows_per_shard)))):
        # Ray's own batch -> Arrow conversion: tensor columns get the type Ray Data writes
        table = BlockAccessor.batch_to_block({k: v[rows] for k, v in part.items()})
        path = f"{where}/{name}-{i:05d}.parquet"
        pq.write_table(table, path, filesystem=fs, row_group_size=row_group_rows(rows_per_shard))
        shards.append({"path": f"{run.name}/{name}/{name}-{i:05d}.parquet", "rows": len(rows),
                       "bytes": fs.get_file_info(path).size})
    return shards


def text_tail(data: Any, key: str, context: int, run: Any, *blocks: Any) -> dict[str, Any]:
    """Ray task body: kept text rows -> split column, tokenizer (bytes, or a BPE trained on the
    train split), windows, seeded order, Parquet shards. Returns ``{"splits", "tokenizer"}``
    for the manifest."""
    from bigopt.data.prepare import ORDER_KEY, _add_order_key
    from bigopt.data.split import add_split
    from bigopt.data.text import to_windows

    batch = as_batch(concat(blocks))
    key = "group" if "group" in batch else key  # near-dup clusters split as one unit
    batch = add_split(batch, data.split, key)
    tokenizer: dict[str, Any] = {"kind": "bytes", "vocab_size": 256}
    tokenizer_json = None
    if data.tokenizer == "bpe":
        from bigopt.data.tokenizer import train_bpe

        started = time.time()
        train = (bytes(t).decode("utf-8", "replace")
                 for t, s in zip(batch["text"], batch["split"], strict=True) if s == "train")
        bpe = train_bpe(train, data.vocab_size)
        tokenizer_json = bpe.to_str()
        run.write_text("tokenizer.json", tokenizer_json)
        tokenizer = {"kind": "bpe", "vocab_size": bpe.get_vocab_size(), "pad_id": 0,
                     "uri": run.uri_of("tokenizer.json"), "trained_on": "train split",
                     "seconds": round(time.time() - started, 2)}
    windows = to_windows({"path": batch["path"], "text": batch["text"], "split": batch["split"]},
                         context, tokenizer_json, tokenizer["vocab_size"])
    windows = _add_order_key(windows, data.shuffle_seed, ["path", "window"])
    splits = {}
    for name in SPLITS:
        mask = windows["split"] == name
        if not mask.any():
            continue
        order = np.argsort(windows[ORDER_KEY][mask], kind="stable")
        part = {k: np.asarray(v)[mask][order] for k, v in windows.items()
                if k not in ("split", ORDER_KEY)}
        splits[name] = {"rows": int(mask.sum()), "tokens": int(part["n_tokens"].sum()),
                        "files": len(set(part["path"].tolist())),
                        "shards": _write_split(part, run, name, data.rows_per_shard)}
    return {"splits": splits, "tokenizer": tokenizer}


def read_text_tree(files: list[str], root: str, max_bytes: int) -> tuple[Any, str]:
    """The read as one Ray task; returns (table ref, content digest)."""
    import ray

    table_ref, digest_ref = submit(read_files, files, root, max_bytes, returns=2)
    return table_ref, ray.get(digest_ref)


def write_text_stage(refs: list[Any], data: Any, key: str, context: int, run: Any) -> dict[str, Any]:
    """The tail as one Ray task over the kept rows ``refs``; returns splits and tokenizer."""
    import ray

    return ray.get(submit(text_tail, data, key, context, run, *refs))
