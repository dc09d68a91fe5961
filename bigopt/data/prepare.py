"""The data stage: source -> checked rows -> split -> tokenized windows -> Parquet shards.

The cleaning steps run in one Ray task per step over an Arrow table for inputs that fit one
worker, and as Ray Data transforms across the cluster for larger ones (``bigopt.data.engine``:
one rule, by measured size); the rest is Ray Data. Rows (source files, records, images) are
conserved: each is kept or rejected with a reason (the reader's own rejects as the "read"
step), every rejected row is written as Parquet under ``data/rejects/``, and the manifest
records ``rows_in == rows_kept + rows_rejected``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from bigopt.artifacts import DataArtifact, SplitInfo
from bigopt.data.engine import choose_engine
from bigopt.data.images import check_image_row, idx_table, load_digits_rows
from bigopt.data.split import split_dataset
from bigopt.data.steps import Handoff, StepContext, run_steps
from bigopt.data.text import list_files, read_and_check, resolve_root, to_windows
from bigopt.resolve import ResolvedJob
from bigopt.runtime import RunDir
from bigopt.spec import (
    TEXT_SOURCES,
    IdxSource,
    ImageFolderSource,
    JobSpec,
    SpecError,
    TableSource,
    TextTreeSource,
)
from bigopt.stages import StageOptions

log = logging.getLogger("bigopt")

SPLITS = ("train", "val", "test")


def split_key(spec: JobSpec) -> str:
    key = spec.data.split.key
    if key != "auto":
        return key
    return "path" if isinstance(spec.data.source, TEXT_SOURCES) else "id"


def _shards(run: RunDir, rel_dir: str) -> list[dict[str, Any]]:
    fs, shards = run.fs, []
    for rel in run.list(rel_dir):
        if not rel.endswith(".parquet"):
            continue
        with fs.open_input_file(run.sub(rel)) as f:
            meta = pq.ParquetFile(f).metadata
        # relative to the run dir, as users read them (``data/train/...``)
        shards.append({"path": f"{run.name}/{rel}", "rows": meta.num_rows,
                       "bytes": fs.get_file_info(run.sub(rel)).size})
    return shards


@dataclass
class SourceRows:
    """What a source hands the shared split/write/manifest code."""

    kept: Any  # ray.data.Dataset of kept rows with a "split" column (model-ready: see model_rows)
    rows_in: int
    info: dict[str, Any]
    #: hash of the source's content, computed from what was read (see ``fingerprint``)
    content_hash: str
    #: per-step records: the reader's rejects ("read") then ``data.steps``
    #: (``bigopt.data.steps.run_steps``); every rejected row is in one of them
    steps: list[dict[str, Any]] = field(default_factory=list)
    #: source rows left after reading and the steps, counted on the data (not derived)
    rows_kept: int | None = None
    #: the manifest's splits, when the single-task path already wrote the shards
    splits: dict[str, Any] | None = None
    #: turns one split's kept rows into model-ready rows (text: token windows), applied split
    #: by split after the filter, so the larger windows are made once and never copied by it;
    #: None: the kept rows are model-ready
    model_rows: Callable[[Any], Any] | None = None


def _clean(spec: JobSpec, ds: Any, run: RunDir, ctx: StepContext, *, read: bool = True,
           input_bytes: int | None = None, engine: str | None = None,
           ) -> tuple[Any, list[dict[str, Any]], int]:
    """The reader's rejects (``read``: ``ds`` has a ``reject_reason`` column) then
    ``data.steps`` on the source rows; returns (kept rows, step records, kept count)."""
    assert spec.data is not None
    kept, records = run_steps(ds, spec.data.steps, ctx, run, engine=engine or spec.data.engine,
                              read=read, input_bytes=input_bytes)
    # the last step counted its kept rows on the data itself; with no step at all, count here
    return kept, records, records[-1]["kept"] if records else kept.count()


def _driver_read_record(run: RunDir, rejected: list[dict[str, Any]], rows_in: int,
                        key: str) -> dict[str, Any]:
    """The "read" step of a source checked in the driver (IDX): its few rejects as Parquet."""
    import pyarrow as pa

    from bigopt.data.engine import reason_counts, step_record, write_rejects

    reasons = [r["reason"] for r in rejected]
    if rejected:
        write_rejects(run, "rejects/read", pa.table({
            key: [r["key"] for r in rejected], "reason": reasons, "step": ["read"] * len(rejected)}))
    return step_record("read", rows_in, rows_in - len(rejected), len(rejected),
                       reason_counts(reasons), "rejects/read", run.name, 0.0, {}, "single")


def _text_rows(spec: JobSpec, context: int, run: RunDir) -> SourceRows:
    import ray

    src = spec.data.source
    root = resolve_root(src.path)
    files = list_files(root, src.include, src.exclude, src.max_files)
    if not files:
        raise FileNotFoundError(f"data.source: no files under {root} match {src.include}")
    log.info("data: %d files under %s", len(files), root)
    info = {"source": {"kind": src.kind, "root": str(root), "include": src.include}}
    size = _tree_bytes(root, files)
    if size is not None and choose_engine(size, spec.data.engine) == "single":
        from bigopt.data.small import read_text_tree

        table, digest = read_text_tree(files, str(root), src.max_file_bytes)
        return _text_source_rows(spec, context, run, [table], len(files), info, input_bytes=size,
                                 digest=digest)
    rows = ray.data.from_items([{"path": f} for f in files], override_num_blocks=min(len(files), 32))
    checked = Handoff(rows.map_batches(
        read_and_check, fn_kwargs={"root": str(root), "max_bytes": src.max_file_bytes},
        batch_size=32,
    ).materialize())
    return _text_source_rows(spec, context, run, checked, len(files), info, input_bytes=size)


def _tree_bytes(root: Any, files: list[str]) -> int | None:
    """The listed files' total size (what ``choose_engine`` measures for a text tree)."""
    import os

    if isinstance(root, str):  # s3://: Ray Data's in-memory size of what was read instead
        return None
    return sum(os.path.getsize(root / f) for f in files)


def _table_rows(spec: JobSpec, context: int, run: RunDir) -> SourceRows:
    """JSONL / CSV / Parquet records as text rows (``bigopt.data.readers``); rows_in counts
    every record of every file that parsed, plus one row per quarantined file."""
    from bigopt.data.readers import table_rows

    checked, files, info = table_rows(spec.data.source)
    rows_in = checked.count()
    log.info("data: %d records (and quarantined files) in %d %s files", rows_in, files,
             spec.data.source.format)
    handoff = Handoff(checked)
    del checked  # the cleaning steps own the rows from here (``Handoff``)
    return _text_source_rows(spec, context, run, handoff, rows_in, info)


#: Text per ``to_windows`` batch: its windows are ~4-8x the bytes (two int16/int32 tensors per token).
WINDOW_BATCH_TEXT_BYTES = 2 * 2**20


def _text_source_rows(spec: JobSpec, context: int, run: RunDir, checked: Any, rows_in: int,
                      info: dict[str, Any], input_bytes: int | None = None,
                      digest: str | None = None) -> SourceRows:
    """Text rows ``{path, text, reject_reason}`` (a materialized Dataset in a ``Handoff``, or
    the single-task reader's table refs, with its ``digest``; '' keeps a row) -> read
    rejects and steps, split by key, tokenizer, windows: shared by every text source.
    On the single-task path (``choose_engine``) the windows are written here, in one task."""
    assert spec.data is not None
    rows = checked.peek() if isinstance(checked, Handoff) else checked
    if input_bytes is None:
        input_bytes = rows.size_bytes() or 0
    engine = choose_engine(input_bytes, spec.data.engine)
    if digest is None:  # the input's digest, taken before the steps consume (and free) it
        from bigopt.data.digest import dataset_digest

        digest = dataset_digest(rows, "path", "text")
    del rows
    kept, steps, n_kept = _clean(spec, checked, run, StepContext(
        key="path", content="text", label=None, modality="text", seed=spec.data.split.seed),
        input_bytes=input_bytes, engine=engine)
    if engine == "single":
        from bigopt.data.small import write_text_stage

        refs = kept if isinstance(kept, list) else kept.to_arrow_refs()
        out = write_text_stage(refs, spec.data, split_key(spec), context, run)
        return SourceRows(None, rows_in, {**info, "tokenizer": out["tokenizer"], "context": context},
                          digest, steps, n_kept, splits=out["splits"])
    # near-duplicate clusters kept together (near_dedup action: group) split as one key
    key = "group" if "group" in kept.schema().names else split_key(spec)
    kept = split_dataset(kept, spec.data.split, key, label=None)
    tokenizer: dict[str, Any] = {"kind": "bytes", "vocab_size": 256}
    tokenizer_json = None
    if spec.data.tokenizer == "bpe":
        from ray.data.expressions import col

        from bigopt.data.tokenizer import train_bpe

        kept = kept.materialize()
        train_texts = (bytes(r["text"]).decode("utf-8", "replace") for r in
                       kept.filter(expr=col("split") == "train").select_columns(["text"]).iter_rows())
        started = time.time()
        bpe = train_bpe(train_texts, spec.data.vocab_size)  # streamed: the texts never all in memory
        tokenizer_json = bpe.to_str()
        run.write_text("tokenizer.json", tokenizer_json)
        tokenizer = {"kind": "bpe", "vocab_size": bpe.get_vocab_size(), "pad_id": 0,
                     "uri": run.uri_of("tokenizer.json"),
                     "trained_on": "train split", "seconds": round(time.time() - started, 2)}
        log.info("data: BPE tokenizer, %d tokens, trained in %.1f s", bpe.get_vocab_size(),
                 time.time() - started)
    # batches of ~WINDOW_BATCH_TEXT_BYTES of text: 8 files of source code, 1024 short records
    # (at 8 per batch, 1M 300-byte records spent most of their windowing in per-batch overhead)
    avg_bytes = input_bytes / max(1, rows_in)
    batch = int(max(8, min(1024, WINDOW_BATCH_TEXT_BYTES // max(1.0, avg_bytes))))
    return SourceRows(kept, rows_in, {**info, "tokenizer": tokenizer, "context": context},
                      digest, steps, n_kept, model_rows=functools.partial(
                          _windows, context=context, tokenizer_json=tokenizer_json,
                          vocab_size=tokenizer["vocab_size"], batch=batch))


def _windows(texts: Any, context: int, tokenizer_json: str | None, vocab_size: int,
             batch: int) -> Any:
    """Text rows (a Dataset) -> token windows of ``context`` (``bigopt.data.text.to_windows``)."""
    return texts.map_batches(to_windows, fn_kwargs={"context": context,
                                                    "tokenizer_json": tokenizer_json,
                                                    "vocab_size": vocab_size},
                             batch_size=batch)


def _image_rows(spec: JobSpec, run: RunDir) -> SourceRows:
    import ray

    src = spec.data.source
    rows = load_digits_rows(src.max_rows)
    ds = ray.data.from_items([{**r, "reject_reason": check_image_row(r)} for r in rows],
                             override_num_blocks=8)
    kept, steps, n_kept = _clean(spec, ds, run, StepContext(
        key="id", content="inputs", label="labels", modality="image", seed=spec.data.split.seed))
    kept = split_dataset(kept, spec.data.split, split_key(spec), label="labels")
    digest = hashlib.sha256()
    for r in rows:
        digest.update(json.dumps(r, sort_keys=True, default=str).encode())
    return SourceRows(kept, len(rows), {
        "source": {"kind": src.kind, "root": "sklearn.datasets.load_digits", "include": ["8x8"]},
        "classes": 10}, digest.hexdigest(), steps, n_kept)


def _idx_rows(spec: JobSpec, run: RunDir) -> SourceRows:
    """IDX files (Fashion-MNIST): read and checked with vectorised numpy in the driver, handed
    to Ray Data as Arrow blocks; the split column comes with them (t10k -> test)."""
    import ray

    src = spec.data.source
    assert isinstance(src, IdxSource)
    table, rejected, info = idx_table(src.path, src.max_rows, spec.data.split)
    for part in info["parts"].values():
        if tuple(part["image_size"]) != src.image_shape[1:]:
            raise ValueError(f"{part['files'][0]}: images are {part['image_size']}, but an idx "
                             f"source feeds models {list(src.image_shape[1:])} images")
    blocks = max(1, min(4, table.num_rows // 4096))
    rows = table.num_rows // blocks + 1
    ds = ray.data.from_arrow([table.slice(i * rows, rows) for i in range(blocks)])
    rows_in = sum(p["rows"] for p in info["parts"].values())
    ds, steps, n_kept = _clean(spec, ds, run, StepContext(
        key="id", content="inputs", label="labels", modality="image", seed=spec.data.split.seed),
        read=False, input_bytes=table.nbytes)
    steps = [_driver_read_record(run, rejected, rows_in, "id"), *steps]
    digest = hashlib.sha256("".join(info["hashes"]).encode())
    return SourceRows(ds, rows_in, {
        "source": {"kind": src.kind, "root": src.path, "include": [
            f.rsplit("/", 1)[-1] for p in info["parts"].values() for f in p["files"]]},
        "classes": 10, "parts": info["parts"]}, digest.hexdigest(), steps, n_kept)


def _image_folder_rows(spec: JobSpec, run: RunDir) -> SourceRows:
    """``<path>/<class>/<image>`` decoded by Pillow in Ray Data tasks (``bigopt.data.readers``);
    an image that does not decode is a rejected row naming the file."""
    from bigopt.data.readers import image_folder_rows

    src = spec.data.source
    assert isinstance(src, ImageFolderSource)
    decoded, classes, files = image_folder_rows(src)
    num_classes = getattr(spec.model, "num_classes", None)
    if num_classes is not None and num_classes < len(classes):
        raise SpecError([("model.num_classes", f"{num_classes} < the {len(classes)} class folders "
                          f"under {src.path} ({', '.join(classes[:10])})")])
    from bigopt.data.digest import dataset_digest

    digest = dataset_digest(decoded, "id", "sha256")
    kept, steps, n_kept = _clean(spec, decoded.drop_columns(["sha256"]), run, StepContext(
        key="id", content="inputs", label="labels", modality="image", seed=spec.data.split.seed))
    kept = split_dataset(kept, spec.data.split, split_key(spec), label="labels")
    log.info("data: %d images in %d classes under %s", files, len(classes), src.path)
    return SourceRows(kept, files, {
        "source": {"kind": src.kind, "root": src.path, "include": ["png", "jpg", "jpeg"],
                   "image_shape": list(src.image_shape)},
        "classes": classes, "num_classes": len(classes)}, digest, steps, n_kept)


ORDER_KEY = "_order"


def _add_order_key(batch: dict[str, np.ndarray], seed: int | None,
                   columns: list[str]) -> dict[str, np.ndarray]:
    """A sort key from each row's identity: a seeded hash (a shuffle that does not depend on
    how Ray Data split or ordered the blocks), or, with no seed, the identity itself."""
    ids = ["\0".join(str(batch[c][i]) for c in columns) for i in range(len(batch[columns[0]]))]
    if seed is None:
        batch[ORDER_KEY] = np.array(ids, dtype=object)
    else:
        batch[ORDER_KEY] = np.array(
            [int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest(), "big")
             >> 1 for k in ids], dtype=np.int64)
    return batch


def _sort_blocks(*blocks: Any) -> Any:
    """Ray task body: the blocks as one table in ``ORDER_KEY`` order."""
    from bigopt.data.engine import concat

    return concat(blocks).sort_by(ORDER_KEY)


@dataclass
class SortedSplit:
    """A split's rows in ``ORDER_KEY`` order as consecutive blocks that are made on demand:
    ``rows[i]`` rows in block ``i``, ``sort(i)`` submits the task that makes it (a ref);
    ``cleanup`` removes what the sort left on storage."""

    rows: list[int]
    sort: Callable[[int], Any]
    cleanup: Callable[[], None] | None = None


def sort_split(part: Any, run: RunDir, split: str, engine: str = "auto") -> SortedSplit:
    """``part`` (materialized, with its order key) as a :class:`SortedSplit`; the same rows in
    the same order either way. The engine rule decides: a split the single path would hold is
    sorted by pyarrow in one Ray task (0.1-3 s for Fashion-MNIST's 220 MB); a larger one is
    range-partitioned through Parquet files and sorted a range at a time
    (``bigopt.data.range_sort``: no global shuffle, nothing per row in the driver). Once this
    returns, ``part`` is no longer needed: the caller can drop it before the shards are cut."""
    from bigopt.data import range_sort
    from bigopt.data.engine import choose_engine, submit

    if choose_engine(part.size_bytes() or 0, engine) == "single":
        refs = part.to_arrow_refs()
        return SortedSplit([part.count()], lambda _: submit(_sort_blocks, *refs))
    schema = part.schema()
    seeded = str(schema.types[schema.names.index(ORDER_KEY)]).startswith("int")
    plan = range_sort.partition(part, run.fs, run.sub("_sort"), ORDER_KEY, seeded=seeded)
    return SortedSplit(plan.range_rows, plan.sort, plan.remove)


#: Shard writes in flight per CPU: enough to keep the cluster busy, few enough that only the
#: ranges they read (and the next one, sorted ahead) are held.
WRITES_IN_FLIGHT_PER_CPU = 2


def write_shards(part: Any, run: RunDir, split: str, rows: int, rows_per_shard: int,
                 engine: str = "auto") -> None:
    """Write one split as Parquet shards (:func:`sort_split`, then :func:`write_sorted`)."""
    write_sorted(sort_split(part, run, split, engine), run, split, rows, rows_per_shard)


def write_sorted(ordered: SortedSplit, run: RunDir, split: str, rows: int,
                 rows_per_shard: int) -> None:
    """Write one sorted split as Parquet shards: same source, spec and seed -> same rows, same
    order, same shard boundaries and names. Each shard is cut out of the sorted blocks (their
    row counts give each shard's rows) by the task that writes it; a block is made just before
    the first shard that needs it (the next one too, so the CPUs do not wait on it) and
    dropped after the last."""
    try:
        starts = np.cumsum([0] + ordered.rows)
        if int(starts[-1]) != rows:
            raise RuntimeError(f"data: the sorted {split} split has {int(starts[-1])} rows, "
                               f"not {rows}")
        # a data stage run again into the same run dir replaces its shards, never mixes them
        run.fs.delete_dir_contents(run.sub(split), missing_dir_ok=True)
        run.fs.create_dir(run.sub(split), recursive=True)
        _write_sorted_shards(ordered, run, split, rows, rows_per_shard, starts)
    finally:  # the scratch goes whether or not the shards were written
        if ordered.cleanup is not None:
            ordered.cleanup()


def _write_sorted_shards(ordered: SortedSplit, run: RunDir, split: str, rows: int,
                         rows_per_shard: int, starts: np.ndarray) -> None:
    import ray

    from bigopt.data.engine import submit
    from bigopt.data.partition import row_group_rows

    shards = max(1, math.ceil(rows / rows_per_shard))
    in_flight = WRITES_IN_FLIGHT_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1)))
    made: dict[int, Any] = {}
    pending: list[Any] = []
    for k in range(shards):
        lo, hi = k * rows // shards, (k + 1) * rows // shards  # an even cut: sizes differ by <= 1
        # the blocks holding rows [lo, hi), and each one's slice of them
        first, end = np.searchsorted(starts, lo, "right") - 1, np.searchsorted(starts, hi, "left")
        needed = [i for i in range(first, end) if starts[i + 1] > starts[i]]
        for i in [*needed, end]:  # and the next block, sorted ahead
            if i < len(ordered.rows) and ordered.rows[i] and i not in made:
                made[i] = ordered.sort(i)
        for i in [i for i in made if i < first]:
            del made[i]  # its last shard is submitted; the write tasks hold it from here
        while len(pending) >= in_flight:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # a failed write fails the stage here, not at the end
        cuts = [(int(max(lo, starts[i]) - starts[i]), int(min(hi, starts[i + 1]) - starts[i]))
                for i in needed]
        pending.append(submit(_write_shard, run.fs, run.sub(f"{split}/{split}-{k:05d}.parquet"),
                              row_group_rows(rows_per_shard), cuts, *[made[i] for i in needed]))
    made.clear()
    ray.get(pending)


def _write_shard(fs: Any, path: str, row_group: int, cuts: list[tuple[int, int]],
                 *blocks: Any) -> int:
    """Ray task body: rows ``[a, b)`` of each sorted block, in order, without the order key,
    as one Parquet file."""
    from bigopt.data.engine import concat

    table = concat([block.slice(a, b - a) for block, (a, b) in zip(blocks, cuts, strict=True)])
    pq.write_table(table.drop_columns([ORDER_KEY]), path, filesystem=fs, row_group_size=row_group)
    return table.num_rows


def _distinct_in_task(column: str, *blocks: Any) -> int:
    """Ray task body: distinct values of ``column`` over ``blocks``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = pa.chunked_array([t.column(column) for t in blocks])
    return int(pc.count_distinct(values).as_py()) if len(values) else 0


def _count_distinct(part: Any, column: str, engine: str = "auto") -> int:
    """Distinct values of one column of a materialized dataset; only the count reaches the
    driver. By the engine rule on the column's size: one Ray task over the column's blocks
    (Ray's ``unique`` is a hash aggregate: seconds of shuffle tasks for a few thousand strings),
    or, for a column the single path would not hold, a Ray Data groupby whose groups are
    counted where they are."""
    import ray

    from bigopt.data.engine import choose_engine, submit

    # the rule on the column alone: a split of 3.4 GB of windows has 20 MB of paths, counted
    # in one task in seconds (a groupby of them took 23 s at 1.7M windows on 2 cores)
    values = part.select_columns([column]).materialize()
    if choose_engine(values.size_bytes() or 0, engine) == "distributed":
        return values.groupby(column).count().count()
    return int(ray.get(submit(_distinct_in_task, column, *values.to_arrow_refs())))


def fingerprint(job: ResolvedJob, content_hash: str) -> str:
    """Same source content + same data spec + same context and task -> same fingerprint (the
    key a cache of prepared data will use)."""
    assert job.spec.data is not None
    # data.engine changes where the work runs, not what it writes: not part of the key
    key = json.dumps({"data": job.spec.data.model_dump(mode="json", exclude={"engine"}),
                      "context": job.context,
                      "task": job.task, "source": content_hash}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def _write_splits(spec: JobSpec, kept: Any, run: RunDir,
                  model_rows: Callable[[Any], Any] | None = None,
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """The distributed path's tail: model-ready rows -> seeded order -> shards per split (and
    prepare-time augmented copies); returns (the manifest's splits, augmentation record)."""
    from ray.data.expressions import col

    assert spec.data is not None
    identity = ["path", "window"] if isinstance(spec.data.source, TEXT_SOURCES) else ["id"]
    kept = kept.materialize()  # each split filters it (text: rows, ~1/8 of their windows' bytes)

    per_split: dict[str, dict[str, Any]] = {}
    augmented: dict[str, Any] | None = None
    for name in SPLITS:
        started = time.time()
        # a vectorised (Arrow) filter, then this split's model-ready rows with their order keys,
        # materialized once: count, sum and unique below and the shard writer read it
        part = kept.filter(expr=col("split") == name)
        if model_rows is not None:
            part = model_rows(part)
        part = part.drop_columns(["split"]).map_batches(_add_order_key, fn_kwargs={
            "seed": spec.data.shuffle_seed, "columns": identity}, batch_size=1024).materialize()
        n = part.count()
        if n == 0:
            continue
        count_column = "n_tokens" if "n_tokens" in part.schema().names else None
        log.info("data: %s split, %d model-ready rows with their order keys (%.1f s)", name, n,
                 time.time() - started)
        augment = spec.data.augment
        if name == "train" and augment is not None and augment.when == "prepare":
            from bigopt.data.augment import augmented_copies

            copies = part.map_batches(augmented_copies, fn_kwargs={"spec": augment},
                                      batch_size=256).materialize()
            augmented_rows = copies.count()
            part = part.union(copies).materialize()
            if augmented_rows != n * augment.copies or part.count() != n + augmented_rows:
                raise RuntimeError(f"data.augment: {n} rows x {augment.copies} copies gave "
                                   f"{augmented_rows}, {part.count()} rows in all")
            augmented = {"when": "prepare", "copies": augment.copies, "source_rows": n,
                         "rows_added": augmented_rows}
            n = part.count()
        started = time.time()
        key = "path" if count_column else "id"
        tokens = _column_sum(part, count_column) if count_column else 0
        files = _count_distinct(part, key, spec.data.engine)
        counted = time.time()
        ordered = sort_split(part, run, name, spec.data.engine)
        del part  # the sorted split holds the rows now (at 10M rows, 17 GB less in the store)
        write_sorted(ordered, run, name, n, spec.data.rows_per_shard)
        per_split[name] = {"rows": n, "tokens": tokens, "files": files, "shards": _shards(run, name)}
        log.info("data: %s split, %d rows: counted in %.1f s, sorted and written in %.1f s", name,
                 n, counted - started, time.time() - counted)
    return per_split, augmented


def _block_sum(block: Any, column: str) -> Any:
    """Map body: one row, the sum of ``column`` over the block."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pa.table({"sum": [int(pc.sum(block[column]).as_py() or 0)]})


def _column_sum(part: Any, column: str) -> int:
    """Sum of an integer column of a Dataset: one number per block, added here. Not
    ``Dataset.sum``: under the hash shuffle that is one aggregator actor asking for memory
    sized by the whole dataset (17.3 GB for the 10M-row train split, more than the node's
    16 GB), which Ray never schedules: the stage waited forever (BENCHMARKS 7c)."""
    per_block = part.select_columns([column]).map_batches(
        _block_sum, fn_kwargs={"column": column}, batch_size=None, batch_format="pyarrow")
    return sum(int(row["sum"]) for row in per_block.take_all())


def _peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, else KiB


#: Ray Data's shuffle for the data stage's groupbys (exact_dedup, LSH buckets, cogroups, counts),
#: by the source's size on disk (``shuffle_strategy``). Up to ``SORT_SHUFFLE_MAX_SOURCE_BYTES``
#: the sort-based pull shuffle: Ray 2.60's default hash shuffle starts aggregator actors for every
#: groupby, and on 2 cores a groupby + map_groups of 2M rows into 200 partitions took 11 s with
#: it and 1.3 s with the sort shuffle. Above it the hash shuffle: the sort shuffle leaves native
#: memory in the driver that grows with the map blocks (+529 MB for one groupby of 400 blocks;
#: the hash shuffle +16 MB), and at 10M rows the driver reached 1.79 GB with it against 376 MB
#: with the hash shuffle, near_dedup taking about as long either way (1,546 s / 1,519 s;
#: BENCHMARKS 7c). 1 GiB keeps the 1M-row figures (294 MB of Parquet) on the sort shuffle.
SORT_SHUFFLE_MAX_SOURCE_BYTES = 2**30


def shuffle_strategy(source_bytes: int) -> str:
    """The data stage's Ray Data shuffle for a source of ``source_bytes`` on disk."""
    return "sort_shuffle_pull_based" if source_bytes <= SORT_SHUFFLE_MAX_SOURCE_BYTES else "hash_shuffle"


def run_data(job: ResolvedJob, run: RunDir) -> tuple[dict[str, Any], str]:
    """Run the data stage into its stage folder ``run``; returns (manifest, fingerprint)."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    from bigopt.data.cache import source_listing

    assert job.spec.data is not None
    # chosen before any Dataset exists: a Dataset keeps the DataContext it was created under
    strategy = shuffle_strategy(sum(size for _, size, _ in source_listing(job.spec.data.source)))
    log.info("data: Ray Data shuffles: %s", strategy)
    ctx = ray.data.DataContext.get_current()
    previous, ctx.shuffle_strategy = ctx.shuffle_strategy, ShuffleStrategy(strategy)
    try:
        return _run_data(job, run, strategy)
    finally:
        ctx.shuffle_strategy = previous


def _run_data(job: ResolvedJob, run: RunDir, shuffle: str) -> tuple[dict[str, Any], str]:
    spec = job.spec
    assert spec.data is not None
    started = time.time()
    if isinstance(spec.data.source, TextTreeSource):
        assert job.context is not None
        source = _text_rows(spec, job.context, run)
    elif isinstance(spec.data.source, TableSource):
        assert job.context is not None
        source = _table_rows(spec, job.context, run)
    elif isinstance(spec.data.source, ImageFolderSource):
        source = _image_folder_rows(spec, run)
    elif isinstance(spec.data.source, IdxSource):
        source = _idx_rows(spec, run)
    else:
        source = _image_rows(spec, run)
    augmented: dict[str, Any] | None = None
    if source.splits is not None:  # the single-task path wrote its shards already
        per_split = source.splits
    else:
        per_split, augmented = _write_splits(spec, source.kept, run, source.model_rows)
    reasons: dict[str, int] = {}
    for record in source.steps:  # the read step's included: every reject is in data/rejects/
        for kind, n in record["rejected_by_reason"].items():
            reasons[kind] = reasons.get(kind, 0) + n
    rows_rejected = sum(r["rejected"] for r in source.steps)
    # counted on the kept rows themselves; the check below compares it with rows_in
    rows_kept = source.rows_kept if source.rows_kept is not None else source.rows_in - rows_rejected
    manifest = {
        **source.info,
        "rows_in": source.rows_in,
        "rows_kept": rows_kept,
        "rows_rejected": rows_rejected,
        "rejected_by_reason": reasons,
        "steps": source.steps,
        "split": {**spec.data.split.model_dump(), "key": split_key(spec)},
        # augmented copies are extra train rows, outside rows_in = rows_kept + rows_rejected
        "augmented": augmented or ({"when": "train"} if spec.data.augment else None),
        "splits": per_split,
        "seconds": round(time.time() - started, 2),
        "shuffle": shuffle,  # Ray Data's shuffle strategy (``shuffle_strategy``)
        # what the driver held (issue 17, item 3): its peak resident memory over the process's
        # life so far, and the largest function + arguments a step pickled into its tasks
        "driver": {"peak_rss_mb": round(_peak_rss_mb(), 1),
                   "largest_task_arg_bytes": max((r.get("task_arg_bytes", 0) for r in source.steps),
                                                 default=0)},
    }
    if manifest["rows_in"] != rows_kept + rows_rejected:
        raise RuntimeError(f"data: {source.rows_in} rows in != {rows_kept} kept + {rows_rejected} "
                           "rejected: rows were lost")
    manifest["fingerprint"] = fingerprint(job, source.content_hash)
    run.write_json("manifest.json", manifest)
    log.info("data: %d rows kept, %d rejected; per split %s", rows_kept, rows_rejected,
             {k: v["rows"] for k, v in per_split.items()})
    return manifest, manifest["fingerprint"]


def data_stage(job: ResolvedJob, inputs: dict[str, Any], run: RunDir,
               options: StageOptions | None = None) -> DataArtifact:
    """The data stage (stage table entry): prepare shards, return the data artifact."""
    manifest, print_ = run_data(job, run)
    return DataArtifact(
        stage=run.name, run=run.parent.uri, uri=run.uri, manifest=run.uri_of("manifest.json"),
        fingerprint=print_, task=job.task, columns=job.columns, context=job.context,
        tokenizer=manifest.get("tokenizer", {}),
        splits={name: SplitInfo(uri=run.uri_of(name), rows=s["rows"])
                for name, s in manifest["splits"].items()})


def report_section(run: RunDir, artifact: DataArtifact) -> list[str]:
    from bigopt.runtime import filesystem_for

    fs, path = filesystem_for(artifact.manifest)
    with fs.open_input_stream(path) as f:
        manifest = json.loads(f.read())
    lines = ["## Data", "",
             f"- source: {manifest['source']['kind']} `{manifest['source']['root']}`",
             f"- rows in {manifest['rows_in']} = kept {manifest['rows_kept']} + rejected "
             f"{manifest['rows_rejected']} {manifest['rejected_by_reason'] or ''}",
             f"- fingerprint `{artifact.fingerprint[:16]}`"
             + (f" (prepared in {artifact.run})" if artifact.run != run.parent.uri else ""),
             "", "| split | rows | tokens | files | shards |", "|---|---|---|---|---|"]
    for name, s in manifest["splits"].items():
        lines.append(f"| {name} | {s['rows']} | {s['tokens']} | {s['files']} | {len(s['shards'])} |")
    steps = manifest.get("steps") or []
    if len(steps) > 1:
        lines += ["", "### Data quality", "",
                  "| step | rows in | kept | rejected | flagged (kept) | reasons | rejected rows |",
                  "|---|---|---|---|---|---|---|"]
        for r in steps:
            details = r.get("details") or {}
            # action: flag keeps suspects (labels) or clusters (near_dedup group): say how many
            flagged = details.get("flagged", "") if details.get("action") == "flag" else ""
            lines.append(f"| {r['step']} | {r['rows_in']} | {r['kept']} | {r['rejected']} | "
                         f"{flagged} | {r.get('rejected_by_reason') or ''} | {r.get('rejects') or ''} |")
        for r in steps:
            for example in (r.get("details") or {}).get("examples", [])[:3]:
                lines.append(f"- {r['step']} example: `{json.dumps(example)[:200]}`")
        run.write_bytes("steps.png", _steps_plot(steps))
        lines += ["", f"![rows per step]({run.name}/steps.png)"]
    return lines + [""]


def _steps_plot(steps: list[dict[str, Any]]) -> bytes:
    """Rows kept and rejected at each step, as stacked bars."""
    from bigopt.plotting import figure, png

    fig, ax = figure(7, 3.5)
    names = [r["step"] for r in steps]
    ax.bar(names, [r["kept"] for r in steps], label="kept")
    ax.bar(names, [r["rejected"] for r in steps], bottom=[r["kept"] for r in steps],
           label="rejected", color="C3")
    ax.set_ylabel("rows")
    ax.set_title("rows per cleaning step")
    ax.legend()
    return png(fig)
