"""Pair similarities by a hash join in Ray tasks (bigopt.data.pair_join) against a direct lookup."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from bigopt.data import pair_join
from bigopt.data.range_sort import block_refs

WIDTH = 16


def _signatures(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray]:
    keys = [f"doc-{i:04d}" for i in range(n)]
    base = rng.integers(0, 4, size=(n, WIDTH), dtype=np.uint32)  # few values: many equal entries
    return keys, base


@pytest.mark.parametrize("part_bytes", [pair_join.PART_BYTES, 2048])
def test_similarities_match_a_direct_lookup(ray_session, monkeypatch, part_bytes):
    """Every pair once, with the share of equal signature entries; ``min_sim`` drops the pairs
    under it; the same with one partition and with many (pairs crossing partitions)."""
    monkeypatch.setattr(pair_join, "PART_BYTES", part_bytes)
    rng = np.random.default_rng(0)
    keys, sig = _signatures(rng, 200)
    sigs = ray_session.data.from_items([{"path": k, "sig": s} for k, s in zip(keys, sig, strict=True)],
                                       override_num_blocks=4).materialize()
    pairs = sorted({tuple(sorted(rng.choice(len(keys), 2, replace=False).tolist())) for _ in range(500)})
    pair_ds = ray_session.data.from_arrow(pa.table({"a": [keys[i] for i, _ in pairs],
                                                    "b": [keys[j] for _, j in pairs]})).materialize()
    parted = pair_join.partition_signatures(block_refs(sigs), "path", WIDTH)
    assert (parted.parts > 1) == (part_bytes == 2048)
    expect = {(keys[i], keys[j]): float((sig[i] == sig[j]).mean()) for i, j in pairs}
    for min_sim in (None, 0.3):
        refs, rows, nbytes = pair_join.similarities(block_refs(pair_ds), "a", "b", parted, min_sim)
        table = pa.concat_tables(ray_session.get(refs))
        got = {(a, b): s for a, b, s in zip(*(table.column(c).to_pylist() for c in ("a", "b", "sim")),
                                            strict=True)}
        want = {p: s for p, s in expect.items() if min_sim is None or s >= min_sim}
        assert got == want and rows == len(want) == table.num_rows
        assert table.nbytes / 2 <= nbytes <= table.nbytes * 2  # what the engine rule is given
        assert min_sim is None or 0 < len(want) < len(expect)  # the threshold did cut


def test_a_pair_without_signature_is_an_error(ray_session):
    sigs = ray_session.data.from_items([{"path": "a", "sig": np.zeros(WIDTH, np.uint32)}]).materialize()
    pairs = ray_session.data.from_arrow(pa.table({"a": ["a"], "b": ["missing"]})).materialize()
    parted = pair_join.partition_signatures(block_refs(sigs), "path", WIDTH)
    with pytest.raises(Exception, match="have no signature"):
        pair_join.similarities(block_refs(pairs), "a", "b", parted)
