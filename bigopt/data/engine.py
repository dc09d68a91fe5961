"""Where the data stage's work runs: one Ray task over one Arrow table, or Ray Data.

**The rule** (the one place the data stage chooses by size): :func:`choose_engine` looks at the
measured size of the input (the source files' bytes for a text tree, the materialized rows'
in-memory bytes otherwise) and picks

- ``single`` up to ``SINGLE_TASK_MAX_BYTES``: each cleaning step is one Ray task that reads the
  whole input as one Arrow table, marks each row kept or rejected (the same per-row functions
  and the same decisions as the distributed path, with a dict or a numpy sort where that path
  uses a Ray Data ``groupby``), writes its rejects as Parquet and hands the kept table to the
  next step through the object store. No shuffle, no groupby, no materialize per step: on
  2 cores each of those costs seconds of scheduling, more than the work itself on a corpus
  the size of Python's standard library (BENCHMARKS 7a).
- ``distributed`` above it: Ray Data transforms across the cluster, as before.

``data.engine: single | distributed`` forces one (the tests run both on the same input and
compare kept and rejected keys and reasons). Why 256 MiB: the single task holds the input, the
kept copy and the step's working set (MinHash works through ~4M shingles at a time, ~100 MB)
in one worker's memory; 256 MiB of rows stays under ~1 GB there, which any laptop or cluster
node has, while the distributed path's fixed cost (tens of seconds on 2 cores) is repaid only
by inputs far larger than that.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from typing import Any, Literal

import numpy as np

from bigopt.data.steps import SINGLE_STEP_FUNCTIONS, Marked, StepContext, load_step

log = logging.getLogger("bigopt")

Engine = Literal["single", "distributed"]

#: Inputs up to this many bytes run in one Ray task per step (see the module docstring).
SINGLE_TASK_MAX_BYTES = 256 * 2**20


def choose_engine(input_bytes: int, forced: str = "auto") -> Engine:
    """``single`` for inputs up to ``SINGLE_TASK_MAX_BYTES``, else ``distributed``; ``forced``
    (``data.engine``) other than ``auto`` wins."""
    if forced in ("single", "distributed"):
        return forced  # type: ignore[return-value]
    if forced != "auto":
        raise ValueError(f"data.engine: {forced!r}, expected auto, single or distributed")
    return "single" if fits_one_task(input_bytes) else "distributed"


def fits_one_task(nbytes: int) -> bool:
    """The same rule inside the distributed path: a table this small (a join's smaller side,
    near_dedup's candidate pairs with their signatures) is worked in one task or sent to the
    tasks by reference (a broadcast join, Spark's rule) instead of shuffling both sides."""
    return nbytes <= SINGLE_TASK_MAX_BYTES


def has_single(kind: str) -> bool:
    """Whether a step kind has a single-task implementation (labels trains its own tasks)."""
    return kind in SINGLE_STEP_FUNCTIONS


def concat(blocks: tuple[Any, ...] | list[Any]) -> Any:
    """Arrow tables (Ray Data blocks) as one table; an empty input keeps its schema."""
    import pyarrow as pa

    tables = [b for b in blocks if b is not None]
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")


def as_batch(table: Any) -> dict[str, np.ndarray]:
    """The table as the numpy columns a Ray Data ``map_batches`` function receives (tensor
    columns as ndarrays, binary as object arrays): the per-row functions see the same values."""
    import pyarrow as pa

    if any(isinstance(f.type, pa.ExtensionType) for f in table.schema):
        from ray.data.block import BlockAccessor  # Ray's tensor columns: Ray's own conversion

        return BlockAccessor.for_block(table).to_batch_format("numpy")
    # plain columns convert as Ray converts them, without importing Ray Data (~0.7 s in a
    # fresh worker: a quarter of a small corpus's whole stage)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def split_marked(table: Any, marked: Marked, step_name: str) -> tuple[Any, Any]:
    """(kept rows + the step's added columns, rejected rows + ``reason`` and ``step``)."""
    import pyarrow as pa

    reasons = np.asarray(marked.reasons, dtype=object)
    if len(reasons) != table.num_rows:
        raise RuntimeError(f"{step_name}: {len(reasons)} reasons for {table.num_rows} rows")
    keep = reasons == ""
    kept = table.filter(pa.array(keep))
    for name, values in marked.columns.items():
        kept = kept.append_column(name, pa.array(np.asarray(values, dtype=object)[keep].tolist()))
    rejected = table.filter(pa.array(~keep))
    rejected = rejected.append_column("reason", pa.array(reasons[~keep].tolist(), pa.string()))
    rejected = rejected.append_column("step", pa.array([step_name] * rejected.num_rows, pa.string()))
    if marked.drop:
        kept, rejected = kept.drop_columns(marked.drop), rejected.drop_columns(marked.drop)
    return kept, rejected


def write_rejects(run: Any, where: str, rejected: Any) -> None:
    """One Parquet file of a step's rejected rows (a fixed name: a rerun replaces it)."""
    import pyarrow.parquet as pq

    run.fs.create_dir(run.sub(where), recursive=True)
    pq.write_table(rejected, f"{run.sub(where)}/part-00000.parquet", filesystem=run.fs)


def step_record(name: str, rows_in: int, kept: int, rejected: int, reasons: dict[str, int],
                where: str | None, run_name: str, seconds: float, details: dict[str, Any],
                engine: Engine) -> dict[str, Any]:
    """One step's line in the manifest (both engines write the same shape)."""
    return {"step": name, "rows_in": rows_in, "kept": kept, "rejected": rejected,
            "rejected_by_reason": reasons,
            "rejects": f"{run_name}/{where}" if rejected and where else None,  # run-relative
            "seconds": round(seconds, 2), "engine": engine, "details": details}


def reason_counts(reasons: list[str]) -> dict[str, int]:
    """Rejected rows per reason kind (the text before the first colon)."""
    return dict(sorted(Counter(r.split(":")[0] for r in reasons).items()))


def _single_step(kind: str, step: Any, ctx: StepContext, run: Any, where: str, label: str,
                 table: Any) -> tuple[Any, dict[str, Any]]:
    """One step over the whole input; returns (kept table, manifest record)."""
    started = time.time()
    rows_in = table.num_rows
    marked = load_step(SINGLE_STEP_FUNCTIONS[kind])(as_batch(table), step, ctx)
    kept, rejected = split_marked(table, marked, kind)
    # counted on the two outputs, not derived from each other or from the reasons
    if rows_in != kept.num_rows + rejected.num_rows:
        raise RuntimeError(f"{label}: {rows_in} rows in but {kept.num_rows} kept + "
                           f"{rejected.num_rows} rejected: a step lost or duplicated rows")
    details = dict(marked.details)
    reasons = rejected.column("reason").to_pylist()
    if reasons:
        write_rejects(run, where, rejected)
        keys = rejected.column(ctx.key).to_pylist()
        details.setdefault("examples", [{"key": str(k), "reason": r}
                                        for k, r in sorted(zip(keys, reasons, strict=True),
                                                           key=lambda kr: str(kr[0]))[:3]])
    record = step_record(kind, rows_in, kept.num_rows, rejected.num_rows, reason_counts(reasons),
                         where, run.name, time.time() - started, details, "single")
    return kept, record


def _single_steps(plan: list[tuple[str, Any, str, str]], ctx: StepContext, run: Any,
                  *blocks: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Ray task body: consecutive steps over one table, each on the previous one's kept rows
    (no object-store round trip between them); returns (kept table, one record per step)."""
    table, records = concat(blocks), []
    for kind, step, where, label in plan:
        table, record = _single_step(kind, step, ctx, run, where, label, table)
        records.append(record)
    return table, records


def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)


@functools.cache
def _task() -> Any:
    import ray

    return ray.remote(_call)


def submit(fn: Any, *args: Any, returns: int = 1) -> Any:
    """Run ``fn(*args)`` (a module-level function) as a Ray task; refs among ``args`` arrive
    as their values. Every single-path task goes through this one remote function, so they
    share a scheduling class and Ray hands them the worker the previous one warmed (its
    imports done) instead of a fresh worker per function."""
    return _task().options(num_returns=returns).remote(fn, *args)


def as_list(refs: Any, returns: int) -> list[Any]:
    """A task's ``returns`` refs as a list (Ray gives one ref, not a list, for one return)."""
    return [refs] if returns == 1 else list(refs)


def submit_bounded(calls: list[tuple[Any, ...]], returns: int = 1) -> list[list[Any]]:
    """``submit(fn, *args, returns=returns)`` for each ``(fn, *args)`` of ``calls``, with at most
    two tasks per cluster CPU submitted and unfinished: Ray pulls (or restores from spill) a
    queued task's arguments before it runs, so submitting them all would ask for all their
    inputs at once. Returns each call's refs as a list."""
    import ray

    in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    out: list[list[Any]] = []
    pending: list[Any] = []
    for fn, *args in calls:
        while len(pending) >= in_flight:
            _, pending = ray.wait(pending, num_returns=1, fetch_local=False)
        out.append(as_list(submit(fn, *args, returns=returns), returns))
        pending.append(out[-1][0])
    return out


def run_single_steps(refs: list[Any], plan: list[tuple[str, Any, str, str]], ctx: StepContext,
                     run: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Run consecutive steps (``(kind, spec, rejects dir, label)``) in one Ray task over the
    blocks ``refs``; returns (kept table ref, records): the kept rows stay in the object store,
    only the small records come back to the driver."""
    import ray

    from bigopt.data.steps import pickled_bytes

    kept_ref, records_ref = submit(_single_steps, plan, ctx, run, *refs, returns=2)
    # what the task receives besides the table refs: the plan, the context, the run dir
    shipped = pickled_bytes(_single_steps, plan, ctx, run)
    return kept_ref, [{**r, "task_arg_bytes": shipped} for r in ray.get(records_ref)]
