"""Cleaning steps: ``data.steps`` run in order on the source rows, each as Ray Data transforms.

A step is ``fn(ds, step_spec, ctx) -> StepOutput``: the rows it keeps and the rows it rejects
(with ``step`` and ``reason`` columns). ``run_steps`` runs the list, counts each step's input,
kept and rejected rows independently (three ``count()``s, none derived from another) and stops
on any mismatch, writes every rejected row with Ray Data to ``data/rejects/NN-<kind>/``
(Parquet), and returns per-step counts for the manifest and the report. Steps are registered
by ``kind`` in ``STEP_FUNCTIONS`` (``module:function``, imported when used).
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

STEP_FUNCTIONS: dict[str, str] = {
    "incomplete": "bigopt.data.steps:incomplete_rows",
    "noise": "bigopt.data.steps:noise_filter",
    "exact_dedup": "bigopt.data.dedup:exact_duplicates",
    "near_dedup": "bigopt.data.dedup:near_duplicates",
    "labels": "bigopt.data.labels:label_errors",
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
    kept: Any  # ray.data.Dataset
    rejected: Any  # ray.data.Dataset: the input columns + "step" + "reason"
    details: dict[str, Any] = field(default_factory=dict)


def split_by_reason(ds: Any, step: str, reasons: Callable[[dict[str, np.ndarray]], list[str]]) -> StepOutput:
    """Kept/rejected from a per-batch function giving each row's reject reason ('' keeps it)."""
    from ray.data.expressions import col

    def mark(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch[REASON] = np.array(reasons(batch), dtype=object)
        return batch

    marked = ds.map_batches(mark, batch_size=256).materialize()
    kept = marked.filter(expr=col(REASON) == "").drop_columns([REASON])

    def label(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["reason"] = batch.pop(REASON)
        batch["step"] = np.array([step] * len(batch["reason"]), dtype=object)
        return batch

    rejected = marked.filter(expr=col(REASON) != "").map_batches(label, batch_size=256)
    return StepOutput(kept, rejected)


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | np.bytes_):
        return bytes(value).decode("utf-8")  # UnicodeDecodeError: the caller's reason
    return str(value)


def incomplete_rows(ds: Any, step: Any, ctx: StepContext) -> StepOutput:
    def reasons(batch: dict[str, np.ndarray]) -> list[str]:
        out = []
        for i in range(len(batch[ctx.key])):
            why = ""
            for name, values in batch.items():
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
                pixels = np.asarray(batch[ctx.content][i], dtype=np.float32)
                if pixels.size == 0 or not np.all(np.isfinite(pixels)):
                    why = f"incomplete: {ctx.content} has missing or non-finite pixels"
            if not why and ctx.label is not None and batch[ctx.label][i] is None:
                why = f"incomplete: {ctx.label} is null"
            out.append(why)
        return out

    return split_by_reason(ds, "incomplete", reasons)


def noise_reason(text: str, step: Any, patterns: list[re.Pattern[str]]) -> str:
    """Why ``text`` is noise under ``step`` (a NoiseStep), or ''."""
    if len(text) < step.min_chars:
        return f"noise: {len(text)} chars < min_chars {step.min_chars}"
    if step.max_chars is not None and len(text) > step.max_chars:
        return f"noise: {len(text)} chars > max_chars {step.max_chars}"
    odd = sum(1 for ch in text if not ch.isprintable() and not ch.isspace()
              or unicodedata.category(ch) == "Co")
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


def noise_filter(ds: Any, step: Any, ctx: StepContext) -> StepOutput:
    patterns = [re.compile(p) for p in step.reject_patterns]

    def reasons(batch: dict[str, np.ndarray]) -> list[str]:
        out = []
        for value in batch[ctx.content]:
            try:
                out.append(noise_reason(_as_text(value) or "", step, patterns))
            except UnicodeDecodeError:
                out.append("noise: not UTF-8")
        return out

    return split_by_reason(ds, "noise", reasons)


def _load(ref: str) -> Callable[..., StepOutput]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def run_steps(ds: Any, steps: list[Any], ctx: StepContext, run: Any, *,
              functions: dict[str, Callable[..., StepOutput]] | None = None,
              ) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``steps`` in order; returns the kept rows and one count record per step.

    ``run`` (a RunDir) receives each step's rejected rows under ``data/rejects/NN-<kind>/``.
    ``functions`` overrides the registry by kind (tests plug in a faulty step with it).
    """
    records = []
    ds = ds.materialize()
    for i, step in enumerate(steps):
        started = time.time()
        rows_in = ds.count()
        fn = (functions or {}).get(step.kind) or _load(STEP_FUNCTIONS[step.kind])
        out = fn(ds, step, ctx)
        kept, rejected = out.kept.materialize(), out.rejected.materialize()
        n_kept, n_rejected = kept.count(), rejected.count()
        if rows_in != n_kept + n_rejected:
            raise RuntimeError(f"data.steps.{i} ({step.kind}): {rows_in} rows in but {n_kept} kept "
                               f"+ {n_rejected} rejected: a step lost or duplicated rows")
        where = f"rejects/{i:02d}-{step.kind}"
        if n_rejected:
            rejected.write_parquet(run.sub(where), filesystem=run.fs)
        reasons: dict[str, int] = {}
        details = dict(out.details)
        if n_rejected:
            for row in rejected.select_columns(["reason"]).iter_rows():
                kind = row["reason"].split(":")[0]
                reasons[kind] = reasons.get(kind, 0) + 1
            details.setdefault("examples", [
                {"key": str(r[ctx.key]), "reason": r["reason"]}
                for r in rejected.select_columns([ctx.key, "reason"]).take(3)])
        records.append({"step": step.kind, "rows_in": rows_in, "kept": n_kept,
                        "rejected": n_rejected, "rejected_by_reason": reasons,
                        "rejects": f"{run.name}/{where}" if n_rejected else None,  # run-relative
                        "seconds": round(time.time() - started, 2), "details": details})
        log.info("data.steps.%d %s: %d in, %d kept, %d rejected (%.1f s)", i, step.kind, rows_in,
                 n_kept, n_rejected, time.time() - started)
        ds = kept
    return ds, records
