"""Keyed lookups and connected components on Ray Data, with nothing per row in the driver.

Ray Data's ``join`` needs polars, which bigopt does not depend on; :func:`cogroup` is the same
thing built from what Ray Data has: both sides' rows are tagged with their key and side
(each row pickled into one binary column, so the two sides share one schema), unioned, and
hash-grouped by key; ``fn(key, left_rows, right_rows)`` then runs in the task holding that
key's rows and returns the output rows (typed by ``columns``). Every use is one shuffle.

:func:`components` labels each node of an undirected edge table with the smallest node of
its connected component by **min-label propagation**: start from each node's smallest
neighbour (or itself), then repeat "send my label to my neighbours, keep the smallest label
heard" (two shuffles) until no label changes, counted with a filter + count. It converges
in as many rounds as the longest shortest path in a component (a handful for near-duplicate
clusters), and its result equals union-find's with the smallest key as root.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger("bigopt")

#: Rounds of label propagation before giving up (a component this long is not a cluster of
#: near-copies; the error says so rather than looping on).
MAX_ROUNDS = 100


def _tag(batch: dict[str, np.ndarray], key: str, side: int) -> Any:
    import pyarrow as pa

    n = len(batch[key])
    rows = [pickle.dumps({c: batch[c][i] for c in batch}) for i in range(n)]
    return pa.table({"_k": pa.array([str(k) for k in batch[key]], pa.string()),
                     "_side": pa.array([side] * n, pa.int8()),
                     "_row": pa.array(rows, pa.binary())})


def _apply(group: Any, fn: Callable[..., list[dict[str, Any]]], columns: dict[str, Any]) -> Any:
    import pyarrow as pa

    sides = group.column("_side").to_pylist()
    rows = [pickle.loads(r) for r in group.column("_row").to_pylist()]
    left = [r for r, s in zip(rows, sides, strict=True) if s == 0]
    right = [r for r, s in zip(rows, sides, strict=True) if s == 1]
    out = fn(group.column("_k")[0].as_py(), left, right)
    return pa.table({name: pa.array([r[name] for r in out], type=t) for name, t in columns.items()})


def cogroup(left: Any, right: Any, left_key: str, right_key: str,
            fn: Callable[[str, list[dict[str, Any]], list[dict[str, Any]]], list[dict[str, Any]]],
            columns: dict[str, Any], partitions: int) -> Any:
    """``fn(key, left rows, right rows) -> rows`` for every key of either side, in Ray Data
    tasks (see the module docstring); ``columns``: the output's name -> pyarrow type."""
    tagged = left.map_batches(_tag, fn_kwargs={"key": left_key, "side": 0}, batch_size=1024).union(
        right.map_batches(_tag, fn_kwargs={"key": right_key, "side": 1}, batch_size=1024))
    return tagged.groupby("_k", num_partitions=partitions).map_groups(
        _apply, fn_kwargs={"fn": fn, "columns": columns}, batch_format="pyarrow")


def _send(node: str, labels: list[dict[str, Any]], edges: list[dict[str, Any]]) -> list[dict[str, Any]]:
    label = labels[0]["label"]
    return [{"node": node, "label": label, "self": True},
            *({"node": e["v"], "label": label, "self": False} for e in edges)]


def _keep_smallest(group: Any) -> Any:
    import pyarrow as pa

    labels = group.column("label").to_pylist()
    old = [lab for lab, me in zip(labels, group.column("self").to_pylist(), strict=True) if me][0]
    new = min(labels)
    return pa.table({"node": [group.column("node")[0].as_py()], "label": [new],
                     "changed": [new != old]})


def _first_label(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Round 0: a node's label is the smaller of itself and its smallest neighbour."""
    return {"node": batch["u"],
            "label": np.array([min(str(u), str(m)) for u, m in zip(batch["u"], batch["m"],
                                                                  strict=True)], dtype=object)}


def components(edges: Any, partitions: int) -> Any:
    """``edges`` ``{u, v}`` (both directions, str) -> ``{node, label}``: every node with an
    edge, labelled with the smallest node of its component (materialized)."""
    import pyarrow as pa
    from ray.data.aggregate import Min
    from ray.data.expressions import col

    labels = edges.groupby("u", num_partitions=partitions).aggregate(Min("v", alias_name="m"))
    labels = labels.map_batches(_first_label, batch_size=4096).materialize()
    for rounds in range(1, MAX_ROUNDS + 1):
        heard = cogroup(labels, edges, "node", "u", _send,
                        {"node": pa.string(), "label": pa.string(), "self": pa.bool_()}, partitions)
        labels = heard.groupby("node", num_partitions=partitions).map_groups(
            _keep_smallest, batch_format="pyarrow").materialize()
        changed = labels.filter(expr=col("changed")).count()
        labels = labels.drop_columns(["changed"]).materialize()
        if changed == 0:
            log.info("components: %d rounds of label propagation", rounds)
            return labels
    raise RuntimeError(f"components: labels still changing after {MAX_ROUNDS} rounds (a chain "
                       f"of over {MAX_ROUNDS} near-duplicates?)")
