"""Cleaning steps: ``data.steps`` run in order on the source rows, in one of two engines.

A step has two implementations with the same decisions row by row (``bigopt.data.engine``
chooses between them by the input's size): ``fn(ds, step_spec, ctx) -> StepOutput`` as Ray
Data transforms (the rows it keeps and the rows it rejects, with ``step`` and ``reason``
columns), registered in ``STEP_FUNCTIONS``, and ``fn(batch, step_spec, ctx) -> Marked`` over
the whole input in one Ray task (one reason per row), in ``SINGLE_STEP_FUNCTIONS``.
``run_steps`` runs the list, counts each step's input, kept and rejected rows independently
(none derived from another) and stops on any mismatch, writes every rejected row as Parquet
to ``data/rejects/NN-<kind>/`` (the reader's own rejects, the "read" step, to
``data/rejects/read/``), and returns per-step records for the manifest and the report.
"""

from __future__ import annotations

import importlib
import logging
import re
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("bigopt")

REASON = "_reject_reason"


class Handoff:
    """The one reference to a large input, handed down a call chain: the callee ``take()``s it,
    so no caller's frame keeps the input alive while later steps run. Why: a materialized
    Dataset kept by a caller pins its blocks in the object store, and at 10M rows those blocks
    (spilled to disk, with every other object fused into the same spill files) filled the disk
    before the stage ended (BENCHMARKS 7c)."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def peek(self) -> Any:
        return self._value

    def take(self) -> Any:
        value, self._value = self._value, None
        return value


STEP_FUNCTIONS: dict[str, str] = {
    "read": "bigopt.data.steps:read_rejects",
    "incomplete": "bigopt.data.steps:incomplete_rows",
    "noise": "bigopt.data.steps:noise_filter",
    "exact_dedup": "bigopt.data.dedup:exact_duplicates",
    "near_dedup": "bigopt.data.dedup:near_duplicates",
    "labels": "bigopt.data.labels:label_errors",
}
#: The same steps over one in-memory batch (the whole input as numpy columns), run in one Ray
#: task by ``bigopt.data.engine``: ``fn(batch, step_spec, ctx) -> Marked``. A kind missing here
#: (labels: it trains its own per-fold tasks) runs distributed whatever the engine.
SINGLE_STEP_FUNCTIONS: dict[str, str] = {
    "read": "bigopt.data.steps:read_single",
    "incomplete": "bigopt.data.steps:incomplete_single",
    "noise": "bigopt.data.steps:noise_single",
    "exact_dedup": "bigopt.data.dedup:exact_duplicates_single",
    "near_dedup": "bigopt.data.dedup:near_duplicates_single",
}


@dataclass(frozen=True)
class StepContext:
    key: str  # column identifying a row: "path" (text files) or "id" (images)
    content: str  # "text" (bytes) or "inputs" (float32 image arrays)
    label: str | None  # "labels" for classifiers
    modality: str  # "text" | "image"
    seed: int


@dataclass
class StepOutput:
    """A step's result on the distributed path (Ray Data)."""

    kept: Any  # ray.data.Dataset
    rejected: Any  # ray.data.Dataset: the input columns + "step" + "reason"
    details: dict[str, Any] = field(default_factory=dict)
    #: the largest function + arguments (pickled) the step sent to its tasks: what grows
    #: here with the data (a captured set of keys) reaches every task (issue 17, item 3)
    task_arg_bytes: int = 0


def pickled_bytes(*objs: Any) -> int:
    """Size of ``objs`` as Ray ships them to a task (cloudpickle)."""
    import cloudpickle

    return len(cloudpickle.dumps(objs))


@dataclass
class Marked:
    """A step's result on the single-task path (``bigopt.data.engine``): one reject reason per
    input row ('' keeps it), in row order, and columns to add to the kept rows."""

    reasons: list[str]
    details: dict[str, Any] = field(default_factory=dict)
    #: full-length columns (one value per input row); the kept rows' values are added
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    #: input columns dropped from both outputs (the read step's reason column)
    drop: list[str] = field(default_factory=list)


def split_by_reason(ds: Any, step: str, reasons: Callable[[dict[str, np.ndarray]], list[str]]) -> StepOutput:
    """Kept/rejected from a per-batch function giving each row's reject reason ('' keeps it)."""

    def mark(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch[REASON] = np.array(reasons(batch), dtype=object)
        return batch

    out = split_marked_dataset(ds.map_batches(mark, batch_size=256).materialize(), step)
    out.task_arg_bytes = pickled_bytes(mark)
    return out


def _label(batch: dict[str, np.ndarray], step: str) -> dict[str, np.ndarray]:
    batch["reason"] = batch.pop(REASON)
    batch["step"] = np.array([step] * len(batch["reason"]), dtype=object)
    return batch


def split_marked_dataset(marked: Any, step: str) -> StepOutput:
    """Kept/rejected from a Ray Dataset with a ``REASON`` column ('' keeps a row)."""
    from ray.data.expressions import col

    kept = marked.filter(expr=col(REASON) == "").drop_columns([REASON])
    rejected = marked.filter(expr=col(REASON) != "").map_batches(
        _label, fn_kwargs={"step": step}, batch_size=256)
    return StepOutput(kept, rejected)


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | np.bytes_):
        return bytes(value).decode("utf-8")  # UnicodeDecodeError: the caller's reason
    return str(value)


def incomplete_reasons(batch: dict[str, np.ndarray], ctx: StepContext) -> list[str]:
    """Each row's ``incomplete`` reject reason ('' keeps it): a null field, an empty or
    non-UTF-8 text, missing or non-finite pixels, a null label."""
    out = []
    # only object columns can hold a None (a numeric or tensor column cannot)
    nullable = [(name, values) for name, values in batch.items()
                if np.asarray(values).dtype == object]
    finite = None
    pixels_all = batch[ctx.content]
    if ctx.modality != "text" and isinstance(pixels_all, np.ndarray) and pixels_all.dtype != object:
        # a tensor column (every image one shape): all rows checked in one vectorised pass
        flat = pixels_all.reshape(len(pixels_all), -1)
        finite = np.isfinite(flat.astype(np.float32, copy=False)).all(axis=1) & (flat.shape[1] > 0)
    for i in range(len(batch[ctx.key])):
        why = ""
        for name, values in nullable:
            if values[i] is None:
                why = f"incomplete: {name} is null"
                break
        if not why and ctx.modality == "text":
            try:
                text = _as_text(batch[ctx.content][i])
                if not text or not text.strip():
                    why = f"incomplete: {ctx.content} is empty"
            except UnicodeDecodeError as exc:
                why = f"incomplete: {ctx.content} is not UTF-8 ({exc.reason} at byte {exc.start})"
        elif not why:
            if finite is not None:
                ok = bool(finite[i])
            else:
                pixels = np.asarray(batch[ctx.content][i], dtype=np.float32)
                ok = pixels.size > 0 and bool(np.all(np.isfinite(pixels)))
            if not ok:
                why = f"incomplete: {ctx.content} has missing or non-finite pixels"
        if not why and ctx.label is not None and batch[ctx.label][i] is None:
            why = f"incomplete: {ctx.label} is null"
        out.append(why)
    return out


def incomplete_rows(ds: Any, step: Any, ctx: StepContext) -> StepOutput:
    return split_by_reason(ds, "incomplete", lambda batch: incomplete_reasons(batch, ctx))


def incomplete_single(batch: dict[str, np.ndarray], step: Any, ctx: StepContext) -> Marked:
    return Marked(incomplete_reasons(batch, ctx))


#: ASCII characters that are neither printable nor whitespace (C0 controls but \t-\r and
#: \x1c-\x1f, which Python counts as whitespace, and DEL): what ``noise_reason`` counts as odd
_ODD_ASCII = bytes(c for c in [*range(0x20), 0x7F] if not chr(c).isspace())
_NOT_ODD_ASCII = bytes(c for c in range(0x80) if c not in _ODD_ASCII)


def _odd_characters(text: str) -> int:
    """Characters neither printable nor whitespace, or private-use (mojibake, binary)."""
    if text.isascii():  # most code: count the few odd bytes in C instead of per character
        return len(text.encode("ascii").translate(None, _NOT_ODD_ASCII))
    return sum(1 for ch in text if not ch.isprintable() and not ch.isspace()
               or unicodedata.category(ch) == "Co")


def noise_reason(text: str, step: Any, patterns: list[re.Pattern[str]]) -> str:
    """Why ``text`` is noise under ``step`` (a NoiseStep), or ''."""
    if len(text) < step.min_chars:
        return f"noise: {len(text)} chars < min_chars {step.min_chars}"
    if step.max_chars is not None and len(text) > step.max_chars:
        return f"noise: {len(text)} chars > max_chars {step.max_chars}"
    odd = _odd_characters(text)
    if text and odd / len(text) > step.max_nonprintable:
        return f"noise: {odd / len(text):.0%} non-printable characters > {step.max_nonprintable:.0%}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) >= 4:
        repeated = len(lines) - len(set(lines))
        if repeated / len(lines) > step.max_repeated_lines:
            return f"noise: {repeated / len(lines):.0%} repeated lines > {step.max_repeated_lines:.0%}"
    for pattern in patterns:
        if pattern.search(text):
            return f"noise: matches {pattern.pattern!r}"
    return ""


def noise_reasons(batch: dict[str, np.ndarray], step: Any, ctx: StepContext) -> list[str]:
    """Each row's ``noise`` reject reason ('' keeps it)."""
    patterns = [re.compile(p) for p in step.reject_patterns]
    out = []
    for value in batch[ctx.content]:
        try:
            out.append(noise_reason(_as_text(value) or "", step, patterns))
        except UnicodeDecodeError:
            out.append("noise: not UTF-8")
    return out


def noise_filter(ds: Any, step: Any, ctx: StepContext) -> StepOutput:
    return split_by_reason(ds, "noise", lambda batch: noise_reasons(batch, step, ctx))


#: the column a source's reader marks unreadable rows in ('' keeps a row): the "read" step
READ_REASON = "reject_reason"


def read_rejects(ds: Any, step: Any, ctx: StepContext) -> StepOutput:
    """The "read" step: rows the source's reader could not use (a file that does not parse or
    decode, too large, empty), with the reader's reason."""
    from ray.data.expressions import col

    kept = ds.filter(expr=col(READ_REASON) == "").drop_columns([READ_REASON])

    def label(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["reason"] = batch.pop(READ_REASON)
        batch["step"] = np.array(["read"] * len(batch["reason"]), dtype=object)
        return batch

    return StepOutput(kept, ds.filter(expr=col(READ_REASON) != "").map_batches(label, batch_size=256))


def read_single(batch: dict[str, np.ndarray], step: Any, ctx: StepContext) -> Marked:
    return Marked([str(r) for r in batch[READ_REASON]], drop=[READ_REASON])


def noise_single(batch: dict[str, np.ndarray], step: Any, ctx: StepContext) -> Marked:
    return Marked(noise_reasons(batch, step, ctx))


def load_step(ref: str) -> Callable[..., Any]:
    """A registered step function from its ``module:function`` name."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _reason_partials(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data task: rejected rows per reason kind in this batch (``reason_counts``' rule)."""
    from bigopt.data.engine import reason_counts

    counts = reason_counts([str(r) for r in batch["reason"]])
    return {"kind": np.array(list(counts), dtype=object),
            "n": np.array(list(counts.values()), dtype=np.int64)}


def _distributed_step(ds: Any, kind: str, fn: Callable[..., StepOutput], step: Any,
                      ctx: StepContext, run: Any, where: str, label: str,
                      ) -> tuple[Any, dict[str, Any]]:
    """One step as Ray Data transforms; returns (kept rows, materialized; manifest record)."""
    from bigopt.data.engine import step_record

    started = time.time()
    rows_in = ds.count()
    out = fn(ds, step, ctx)
    kept, rejected = out.kept.materialize(), out.rejected.materialize()
    n_kept, n_rejected = kept.count(), rejected.count()
    if rows_in != n_kept + n_rejected:
        raise RuntimeError(f"{label}: {rows_in} rows in but {n_kept} kept "
                           f"+ {n_rejected} rejected: a step lost or duplicated rows")
    details = dict(out.details)
    by_reason: dict[str, int] = {}
    if n_rejected:
        rejected.write_parquet(run.sub(where), filesystem=run.fs)
        # counted in the tasks (one partial count per reason kind and batch), summed here:
        # the driver sees kinds x batches numbers, never the rejected rows themselves
        for part in rejected.select_columns(["reason"]).map_batches(
                _reason_partials, batch_size=65536).iter_rows():
            by_reason[part["kind"]] = by_reason.get(part["kind"], 0) + int(part["n"])
        by_reason = dict(sorted(by_reason.items()))
        details.setdefault("examples", [
            {"key": str(r[ctx.key]), "reason": r["reason"]}
            for r in rejected.select_columns([ctx.key, "reason"]).take(3)])
    record = step_record(kind, rows_in, n_kept, n_rejected, by_reason, where,
                         run.name, time.time() - started, details, "distributed")
    return kept, {**record, "task_arg_bytes": out.task_arg_bytes}


def run_steps(ds: Any, steps: list[Any], ctx: StepContext, run: Any, *,
              functions: dict[str, Callable[..., StepOutput]] | None = None,
              engine: str = "auto", read: bool = False, input_bytes: int | None = None,
              ) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``steps`` in order; returns the kept rows and one record per step.

    ``ds``: a Ray Dataset, or a list of refs to Arrow tables (then the kept rows come back as
    such a list too), or either in a ``Handoff`` (taken here: the input is freed once the first
    step has consumed it).

    ``read``: ``ds`` has the reader's ``reject_reason`` column, split off first as the "read"
    step. ``run`` (a RunDir) receives each step's rejected rows as Parquet under
    ``data/rejects/NN-<kind>/`` (the read step's under ``data/rejects/read/``). ``engine``
    (``data.engine``) and the input's size choose where each step runs
    (``bigopt.data.engine.choose_engine``: ``input_bytes``, else the rows' in-memory size).
    ``functions`` overrides the registry by kind (tests plug in a faulty step with it); an
    overridden step runs distributed.
    """
    import ray

    from bigopt.data.engine import choose_engine, has_single, run_single_steps

    if isinstance(ds, Handoff):
        ds = ds.take()
    # blocks in the object store (the single-task reader's) stay blocks: no Ray Data at all
    as_refs = isinstance(ds, list)
    refs: list[Any] | None = ds if as_refs else None  # the single-task path's table
    ds = None if as_refs else ds.materialize()
    if input_bytes is None:
        input_bytes = ds.size_bytes() if ds is not None else 0
    chosen = choose_engine(input_bytes or 0, engine)
    # (kind, spec, where its rejects go, how errors name it)
    plan = [("read", None, "rejects/read", "data read")] if read else []
    plan += [(step.kind, step, f"rejects/{i:02d}-{step.kind}", f"data.steps.{i} ({step.kind})")
             for i, step in enumerate(steps)]
    records: list[dict[str, Any]] = []
    while plan:
        kind, step, where, label = plan[0]
        override = (functions or {}).get(kind)
        if chosen == "single" and override is None and has_single(kind):
            # this step and the single-capable ones right after it: one task
            n = 1
            while n < len(plan) and has_single(plan[n][0]) and plan[n][0] not in (functions or {}):
                n += 1
            refs = refs if refs is not None else ds.to_arrow_refs()
            kept_ref, done = run_single_steps(refs, plan[:n], ctx, run)
            refs, ds, plan = [kept_ref], None, plan[n:]
        else:
            if ds is None:
                ds = ray.data.from_arrow_refs(refs)
            ds, record = _distributed_step(ds, kind, override or load_step(STEP_FUNCTIONS[kind]),
                                           step, ctx, run, where, label)
            refs, plan, done = None, plan[1:], [record]
        for record in done:
            records.append(record)
            log.info("data.steps %s (%s): %d in, %d kept, %d rejected (%.1f s)", record["step"],
                     record["engine"], record["rows_in"], record["kept"], record["rejected"],
                     record["seconds"])
    if as_refs:
        return (refs if refs is not None else ds.to_arrow_refs()), records
    return (ds if ds is not None else ray.data.from_arrow_refs(refs)), records
