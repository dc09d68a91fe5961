"""Train/val/test split by a hash of a stable key, optionally stratified by label.

Plain split: a unit (a file, a record id, or a near-duplicate cluster) goes to test when the
hash of ``seed:key`` mapped to [0, 1) is below ``split.test``, to val below ``test + val``,
else to train. Each row is decided alone, so the split depends neither on row order nor on the
number of workers; the proportions are right only in expectation.

Stratified split (``data.split.stratify``): within each label, units are ranked by the same
hash and the first ``round(n * test)`` go to test, the next ``round(n * val)`` to val. The ranks
are turned into two hash cut points per label (computed by Ray Data ``groupby`` tasks, so the
keys never gather in the driver); a row is then decided alone against its label's cut points.
A unit whose rows carry different labels (a near-duplicate cluster with mixed labels) is placed
by its smallest label, so that it still lands whole in one split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from bigopt.spec import SplitSpec


def unit_hash(key: str, seed: int) -> float:
    """The unit's position in [0, 1): the same key always lands at the same place."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def by_threshold(u: float, test: float, val_end: float) -> str:
    if u < test:
        return "test"
    if u < val_end:
        return "val"
    return "train"


def assign_split(key: str, split: SplitSpec) -> str:
    """Deterministic split of one row from its key: independent of row order and of workers."""
    return by_threshold(unit_hash(key, split.seed), split.test, split.test + split.val)


@dataclass(frozen=True)
class Cuts:
    """Per label: units hashed below ``test`` go to test, below ``val_end`` to val."""

    test: dict[Any, float]
    val_end: dict[Any, float]
    #: units with rows of several labels -> the label that places them (their smallest)
    mixed: dict[str, Any]


def cut_points(hashes: np.ndarray, split: SplitSpec) -> tuple[float, float]:
    """The two cut points that send exactly round(n*test) / round(n*val) of ``hashes`` (one per
    unit of a label) to test / val."""
    u = np.sort(np.asarray(hashes, dtype=np.float64))
    n = len(u)
    n_test = int(round(n * split.test))
    n_val = int(round(n * split.val))

    def cut(k: int) -> float:
        return float(u[k]) if k < n else 2.0  # past every hash: all of them below

    return cut(n_test), cut(n_test + n_val)


def stratified_assign(keys: np.ndarray, labels: np.ndarray, split: SplitSpec) -> np.ndarray:
    """In-memory stratified split (the IDX reader's numpy path); same rule as ``stratified_cuts``."""
    u = np.array([unit_hash(str(k), split.seed) for k in keys], dtype=np.float64)
    out = np.empty(len(keys), dtype=object)
    for label in np.unique(labels):
        rows = labels == label
        # one hash per unit: repeated keys are one unit
        test, val_end = cut_points(np.unique(u[rows]), split)
        out[rows] = np.where(u[rows] < test, "test", np.where(u[rows] < val_end, "val", "train"))
    return out


def stratified_cuts(ds: Any, unit: str, label: str, split: SplitSpec) -> Cuts:
    """Cut points per label for a Ray Data ``ds`` with columns ``unit`` and ``label``."""
    from ray.data.aggregate import Max, Min

    units = ds.select_columns([unit, label]).groupby(unit).aggregate(Min(label), Max(label))
    lo, hi = f"min({label})", f"max({label})"
    units = units.materialize()
    mixed = {str(r[unit]): r[lo] for r in units.filter(lambda r: r[lo] != r[hi]).iter_rows()}
    seed = split.seed

    def cuts_of_label(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        u = np.array([unit_hash(str(k), seed) for k in group[unit]], dtype=np.float64)
        test, val_end = cut_points(u, split)
        return {"label": group[lo][:1], "test": np.array([test]), "val_end": np.array([val_end]),
                "units": np.array([len(u)])}

    rows = units.groupby(lo).map_groups(cuts_of_label, batch_format="numpy").take_all()
    return Cuts(test={_plain(r["label"]): float(r["test"]) for r in rows},
                val_end={_plain(r["label"]): float(r["val_end"]) for r in rows}, mixed=mixed)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def add_split(batch: dict[str, np.ndarray], split: SplitSpec, key: str, label: str | None = None,
              cuts: Cuts | None = None) -> dict[str, np.ndarray]:
    """``map_batches`` body: a ``split`` column from each row's key (and label, when stratified)."""
    if cuts is None:
        batch["split"] = np.array([assign_split(str(k), split) for k in batch[key]], dtype=object)
        return batch
    out = []
    for k, y in zip(batch[key], batch[label], strict=True):
        k = str(k)
        y = cuts.mixed.get(k, _plain(y))
        out.append(by_threshold(unit_hash(k, split.seed), cuts.test[y], cuts.val_end[y]))
    batch["split"] = np.array(out, dtype=object)
    return batch


def split_dataset(ds: Any, split: SplitSpec, key: str, label: str | None) -> Any:
    """``ds`` with a ``split`` column; stratified by ``label`` when ``split.stratify``."""
    cuts = stratified_cuts(ds, key, label, split) if split.stratify and label else None
    return ds.map_batches(add_split, fn_kwargs={"split": split, "key": key, "label": label,
                                                "cuts": cuts}, batch_size=256)
