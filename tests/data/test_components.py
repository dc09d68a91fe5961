"""Connected components (min-label propagation on Ray Data; scipy in one task) against union-find."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from bigopt.data.components import cogroup, components, label_components


def union_find_labels(edges: list[tuple[str, str]]) -> dict[str, str]:
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}


@pytest.mark.slow
def test_components_match_union_find(ray_session):
    rng = random.Random(3)
    nodes = [f"k{i:03d}" for i in range(40)]
    edges = [tuple(rng.sample(nodes, 2)) for _ in range(16)]
    edges += [(f"c{i:02d}", f"c{i + 1:02d}") for i in range(3)]  # a chain: several rounds
    rows = [{"u": a, "v": b} for a, b in edges] + [{"u": b, "v": a} for a, b in edges]
    got = {r["node"]: r["label"] for r in
           components(ray_session.data.from_items(rows, override_num_blocks=3), 4).iter_rows()}
    assert got == union_find_labels(edges)


def test_cogroup_sees_both_sides_of_every_key(ray_session):
    left = ray_session.data.from_items([{"k": "a", "x": 1}, {"k": "b", "x": 2}, {"k": "a", "x": 3}])
    right = ray_session.data.from_items([{"id": "a", "y": 10}, {"id": "c", "y": 30}])
    out = cogroup(left, right, "k", "id", lambda key, ls, rs: [
        {"key": key, "xs": sum(r["x"] for r in ls), "ys": sum(r["y"] for r in rs)}],
        {"key": pa.string(), "xs": pa.int64(), "ys": pa.int64()}, 2)
    assert sorted((r["key"], r["xs"], r["ys"]) for r in out.iter_rows()) == [
        ("a", 4, 10), ("b", 2, 0), ("c", 0, 30)]


def test_label_components_match_union_find():
    """One task's labelling: every node of an edge labelled with its component's smallest key,
    whatever the edges' direction and order; keys compared as Python compares strings."""
    rng = random.Random(5)
    nodes = [f"k{i:03d}" for i in range(60)] + ["é1", "z", "Z", "a b"]
    edges = [tuple(rng.sample(nodes, 2)) for _ in range(30)]
    edges += [(f"c{i:02d}", f"c{i + 1:02d}") for i in range(5)][::-1]
    table = pa.table({"a": [a for a, _ in edges], "b": [b for _, b in edges]})
    labels, component, smallest = label_components(table, "a", "b")
    got = dict(zip(labels.column("node").to_pylist(), labels.column("label").to_pylist(), strict=True))
    assert got == union_find_labels(edges)
    assert labels.column("node").to_pylist() == sorted(got)  # nodes in key order
    assert len(set(component.tolist())) == len(set(got.values()))
    assert sorted(labels.column("node").take(smallest).to_pylist()) == sorted(set(got.values()))
