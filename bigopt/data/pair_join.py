"""Each pair's similarity from its two rows' signatures, over the 256 MiB rule, as plain Ray tasks.

near_dedup's candidate pairs and the signatures of their keys fit one task up to about 1M rows
(``bigopt.data.dedup``: verified and clustered there). At 10M they are ~1 GB, and the lookups
were Ray Data shuffles (two cogroups to verify, label propagation, two more cogroups for each
member's similarity with its kept key): 1,177 s, and the driver's memory grew by ~45 MB
(native memory Ray Data's hash shuffles leave behind, BENCHMARKS 7c). This is the same join
written as a hash partitioning in Ray tasks, Ray's own "shuffle with tasks" pattern:

1. **Split.** One task per group of signature blocks (about ``GROUP_BYTES``) splits its rows
   into ``P`` hash partitions of the key and returns them as ``P`` objects (``num_returns``);
   the pairs are split the same way by their first key ``x``.
2. **Attach.** Task ``p`` takes partition ``p`` of the signatures and of the pairs, gives each
   pair ``x``'s signature (an index lookup, no Python per row) and splits the result again,
   by the second key ``y``, into ``P`` objects.
3. **Compare.** Task ``q`` takes partition ``q`` of the signatures and part ``q`` of every
   attach task: the share of equal entries of the two signatures, the single path's estimate
   of Jaccard, and (verification) only the pairs at or above the threshold.

The signature partitions are split once and serve every join of the step (verification, then
each member against its kept key). ``P`` is chosen so a partition is about ``PART_BYTES``.
What the driver holds: object references (groups x P, a few hundred at 10M rows) and one row
count per partition, nothing per row. ``split_rows`` (with ``components.hash_partition``,
``engine.submit_bounded`` and ``range_sort.group_blocks``) serves near_dedup's candidate pairs
the same way. Ray spills the partitions to disk as the object store fills, as it does any task
output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Bytes of signatures per hash partition: what an attach or compare task holds, plus its pairs.
PART_BYTES = 64 * 2**20
#: Bytes of blocks per split task.
GROUP_BYTES = 256 * 2**20


def signature_matrix(column: Any, width: int) -> np.ndarray:
    """``uint32[rows, width]`` from a signature column: Ray Data's tensor column (as the
    signatures step writes it) or the fixed-size lists this module passes between tasks."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if hasattr(array, "to_numpy_ndarray"):  # Ray Data's tensor extension array
        return np.asarray(array.to_numpy_ndarray(), dtype=np.uint32).reshape(-1, width)
    return array.flatten().to_numpy(zero_copy_only=False).astype(np.uint32).reshape(-1, width)


def _as_list_column(matrix: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.uint32()),
                                             matrix.shape[1])


def split_rows(table: Any, where: np.ndarray, parts: int) -> Any:
    """``table``'s rows by partition ``where``: a tuple of ``parts`` tables (one table when
    ``parts`` is 1, as Ray expects of a task with one return). Each part is a copy (``take``),
    so a part's object does not carry the whole table's buffers."""
    order = np.argsort(where, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(where, minlength=parts))])
    out = tuple(table.take(order[bounds[p]:bounds[p + 1]]) for p in range(parts))
    return out[0] if parts == 1 else out


def _split_signatures(key: str, width: int, parts: int, *blocks: Any) -> Any:
    """Ray task: signature blocks as ``{k, sig}`` (fixed-size lists), in hash partitions of ``k``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from bigopt.data.components import hash_partition
    from bigopt.data.engine import concat
    from bigopt.data.range_sort import _arrow

    table = concat([_arrow(b) for b in blocks])
    keys = pc.cast(table.column(key), pa.string())
    out = pa.table({"k": keys, "sig": _as_list_column(signature_matrix(table.column("sig"), width))})
    return split_rows(out, hash_partition(keys, parts), parts)


def _split_pairs(x: str, y: str, parts: int, *blocks: Any) -> Any:
    """Ray task: pair blocks as ``{x, y}`` (strings), in hash partitions of ``x``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from bigopt.data.components import hash_partition
    from bigopt.data.engine import concat
    from bigopt.data.range_sort import _arrow

    table = concat([_arrow(b) for b in blocks])
    xs, ys = pc.cast(table.column(x), pa.string()), pc.cast(table.column(y), pa.string())
    return split_rows(pa.table({"x": xs, "y": ys}), hash_partition(xs, parts), parts)


def _lookup(signatures: Any, keys: Any, width: int) -> np.ndarray:
    """The signatures of ``keys`` (each must be there: every key of a pair has one)."""
    import pyarrow.compute as pc

    at = pc.index_in(keys, value_set=signatures.column("k"))
    if at.null_count:
        raise RuntimeError(f"near_dedup: {at.null_count} keys of candidate pairs have no signature")
    return signature_matrix(signatures.column("sig"), width)[at.to_numpy(zero_copy_only=False)]


def _attach(width: int, parts: int, n_sig: int, *tables: Any) -> Any:
    """Ray task: one partition's pairs with ``x``'s signature, in hash partitions of ``y``."""
    import pyarrow as pa

    from bigopt.data.components import hash_partition
    from bigopt.data.engine import concat

    signatures, pairs = concat(tables[:n_sig]), concat(tables[n_sig:])
    out = pa.table({"x": pairs.column("x"), "y": pairs.column("y"),
                    "sig_x": _as_list_column(_lookup(signatures, pairs.column("x"), width))})
    return split_rows(out, hash_partition(pairs.column("y"), parts), parts)


def _compare(width: int, min_sim: float | None, names: tuple[str, str], n_sig: int,
             *tables: Any) -> tuple[Any, int, int]:
    """Ray task: one partition's pairs (by ``y``) with their similarity ``sim``, those under
    ``min_sim`` dropped, ``x`` and ``y`` named ``names``; returns (table, rows, bytes)."""
    import pyarrow as pa

    from bigopt.data.engine import concat

    signatures, pairs = concat(tables[:n_sig]), concat(tables[n_sig:])
    sim = (signature_matrix(pairs.column("sig_x"), width)
           == _lookup(signatures, pairs.column("y"), width)).mean(axis=1)
    out = pa.table({names[0]: pairs.column("x"), names[1]: pairs.column("y"),
                    "sim": pa.array(sim, pa.float64())})
    if min_sim is not None:
        out = out.filter(pa.array(sim >= min_sim))
    return out, out.num_rows, out.nbytes


@dataclass
class PartitionedSignatures:
    """Signatures split into ``parts`` hash partitions: ``refs[g][p]`` is group ``g``'s part ``p``."""

    refs: list[list[Any]]
    parts: int
    width: int

    def part(self, p: int) -> list[Any]:
        return [group[p] for group in self.refs]


def partition_signatures(blocks: list[tuple[Any, int, int]], key: str, width: int,
                         pairs_bytes: int = 0) -> PartitionedSignatures:
    """Split signature blocks ``(ref, rows, bytes)`` (``range_sort.block_refs``) into hash
    partitions of their key, ``P`` chosen so one partition and its pairs are about ``PART_BYTES``
    (``PART_BYTES`` read at call time)."""
    from bigopt.data.engine import submit_bounded
    from bigopt.data.range_sort import group_blocks

    total = sum(b for _, _, b in blocks) + pairs_bytes
    parts = max(1, math.ceil(total / PART_BYTES))
    refs = submit_bounded([(_split_signatures, key, width, parts, *g)
                           for g in group_blocks(blocks, GROUP_BYTES)], parts)
    return PartitionedSignatures(refs, parts, width)


def similarities(pair_blocks: list[tuple[Any, int, int]], x: str, y: str,
                 sigs: PartitionedSignatures, min_sim: float | None = None
                 ) -> tuple[list[Any], int, int]:
    """``{x, y, sim}`` for every pair of ``pair_blocks`` (``(ref, rows, bytes)`` of tables with
    columns ``x`` and ``y``), those under ``min_sim`` dropped; returns (table refs, rows, bytes)."""
    import ray

    from bigopt.data.engine import submit_bounded
    from bigopt.data.range_sort import group_blocks

    parts, width, n_sig = sigs.parts, sigs.width, len(sigs.refs)
    split = submit_bounded([(_split_pairs, x, y, parts, *g)
                            for g in group_blocks(pair_blocks, GROUP_BYTES)], parts)
    if not split:
        return [], 0, 0
    attached = submit_bounded([(_attach, width, parts, n_sig, *sigs.part(p), *(s[p] for s in split))
                               for p in range(parts)], parts)
    out = submit_bounded([(_compare, width, min_sim, (x, y), n_sig, *sigs.part(q),
                           *(a[q] for a in attached)) for q in range(parts)], 3)
    counts = ray.get([rows for _, rows, _ in out])
    sizes = ray.get([nbytes for _, _, nbytes in out])
    return [table for table, _, _ in out], int(sum(counts)), int(sum(sizes))
