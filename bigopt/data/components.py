"""Keyed lookups and connected components on Ray Data, with nothing per row in the driver.

Ray Data's ``join`` needs polars, which bigopt does not depend on; :func:`cogroup` is the same
thing built from what Ray Data has: both sides' rows are tagged with their key, side and a
hash partition of the key (each row pickled into one binary column, so the two sides share
one schema), unioned, and grouped by partition; in the task holding a partition,
``fn(key, left_rows, right_rows)`` runs for each of its keys and returns the output rows
(typed by ``columns``). Every use is one shuffle. Grouping by partition, not by key, matters:
Ray Data's ``map_groups`` costs about a millisecond per group, which for a million keys is
most of the step; a dict per partition costs microseconds per key.

:func:`components` labels each node of an undirected edge table with the smallest node of
its connected component by **min-label propagation**: start from each node's smallest
neighbour (or itself), then repeat "send my label to my neighbours, keep the smallest label
heard": one cogroup and one ``Min`` aggregation per round, until no label changes, counted
with a filter + count. It converges
in as many rounds as the longest shortest path in a component (a handful for near-duplicate
clusters), and its result equals union-find's with the smallest key as root.

:func:`label_components` is the same labelling for an edge table that fits one task: scipy's
connected components over the keys' ranks, so each component's smallest rank is its smallest
key (Arrow sorts strings by their UTF-8 bytes, which is Python's order of code points).
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
#: sorts after every node key (keys are str(key) of the source's ids)
_TOP = "\U0010ffff"


def hash_partition(keys: Any, partitions: int) -> np.ndarray:
    """Each key's partition in ``[0, partitions)``: pandas' keyed SipHash of the string, the
    same in every process (Python's ``hash`` of a str is not), vectorised."""
    import pandas as pd

    values = np.asarray(keys.to_pylist() if hasattr(keys, "to_pylist") else keys, dtype=object)
    if not len(values):
        return np.zeros(0, dtype=np.int64)
    return (pd.util.hash_array(values) % np.uint64(partitions)).astype(np.int64)


def _tag(batch: dict[str, np.ndarray], key: str, side: int, partitions: int) -> Any:
    import pyarrow as pa

    n = len(batch[key])
    keys = [str(k) for k in batch[key]]
    rows = [pickle.dumps({c: batch[c][i] for c in batch}) for i in range(n)]
    return pa.table({"_p": pa.array(hash_partition(keys, partitions).astype(np.int32), pa.int32()),
                     "_k": pa.array(keys, pa.string()),
                     "_side": pa.array([side] * n, pa.int8()),
                     "_row": pa.array(rows, pa.binary())})


def _apply(part: Any, fn: Callable[..., list[dict[str, Any]]], columns: dict[str, Any]) -> Any:
    """One partition: its rows grouped by key in a dict, ``fn`` per key (in key order)."""
    import pyarrow as pa

    sides: dict[str, tuple[list[bytes], list[bytes]]] = {}
    for k, side, row in zip(part.column("_k").to_pylist(), part.column("_side").to_pylist(),
                            part.column("_row").to_pylist(), strict=True):
        sides.setdefault(k, ([], []))[side].append(row)
    out: list[dict[str, Any]] = []
    for k in sorted(sides):
        left, right = sides[k]
        out += fn(k, [pickle.loads(r) for r in left], [pickle.loads(r) for r in right])
    return pa.table({name: pa.array([r[name] for r in out], type=t) for name, t in columns.items()})


def cogroup(left: Any, right: Any, left_key: str, right_key: str,
            fn: Callable[[str, list[dict[str, Any]], list[dict[str, Any]]], list[dict[str, Any]]],
            columns: dict[str, Any], partitions: int) -> Any:
    """``fn(key, left rows, right rows) -> rows`` for every key of either side, in Ray Data
    tasks (see the module docstring); ``columns``: the output's name -> pyarrow type."""
    tagged = left.map_batches(_tag, fn_kwargs={"key": left_key, "side": 0, "partitions": partitions},
                              batch_size=1024).union(
        right.map_batches(_tag, fn_kwargs={"key": right_key, "side": 1, "partitions": partitions},
                          batch_size=1024))
    return tagged.groupby("_p", num_partitions=partitions).map_groups(
        _apply, fn_kwargs={"fn": fn, "columns": columns}, batch_format="pyarrow")


def _send(node: str, labels: list[dict[str, Any]], edges: list[dict[str, Any]]) -> list[dict[str, Any]]:
    label = labels[0]["label"]
    return [{"node": node, "label": label, "self": True},
            *({"node": e["v"], "label": label, "self": False} for e in edges)]


def _old_label(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``old``: a node's current label on its own row, the largest string elsewhere, so one
    ``Min`` aggregation gives both the new label and the old one."""
    old = np.where(batch["self"].astype(bool), batch["label"], _TOP)
    return {"node": batch["node"], "label": batch["label"], "old": old.astype(object)}


def _changed(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"node": batch["node"], "label": batch["label"],
            "changed": np.asarray(batch["label"] != batch["old"], dtype=bool)}


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
        labels = (heard.map_batches(_old_label, batch_size=65536)
                  .groupby("node", num_partitions=partitions)
                  .aggregate(Min("label", alias_name="label"), Min("old", alias_name="old"))
                  .map_batches(_changed, batch_size=65536).materialize())
        changed = labels.filter(expr=col("changed")).count()
        labels = labels.drop_columns(["changed"]).materialize()
        if changed == 0:
            log.info("components: %d rounds of label propagation", rounds)
            return labels
    raise RuntimeError(f"components: labels still changing after {MAX_ROUNDS} rounds (a chain "
                       f"of over {MAX_ROUNDS} near-duplicates?)")


def label_components(edges: Any, u: str, v: str) -> tuple[Any, np.ndarray, np.ndarray]:
    """An edge table's nodes (columns ``u``, ``v``: strings) as ``{node, label}``, nodes in key
    order, each labelled with its component's smallest node; also each node's component id and
    each component's smallest node (its row in the table)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ends = pa.chunked_array([*edges.column(u).chunks, *edges.column(v).chunks], pa.string())
    nodes = pc.unique(ends)
    nodes = nodes.take(pc.sort_indices(nodes))
    rank_u = pc.index_in(edges.column(u), value_set=nodes).to_numpy(zero_copy_only=False)
    rank_v = pc.index_in(edges.column(v), value_set=nodes).to_numpy(zero_copy_only=False)
    n = len(nodes)
    graph = coo_matrix((np.ones(len(rank_u), dtype=np.int8), (rank_u, rank_v)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(smallest, component, np.arange(n))
    return pa.table({"node": nodes, "label": nodes.take(smallest[component])}), component, smallest
