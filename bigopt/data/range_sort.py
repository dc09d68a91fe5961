"""A split in order-key order without a global shuffle: range partitioning through Parquet.

Ray Data's ``sort`` is a map/reduce shuffle: its map x reduce intermediate objects are owned by
the driver (the 10M-row train split took the driver from 314 to 481 MB) and its output is one
more copy of the split in the object store (40 GB spilled at its peak, BENCHMARKS 7c). The
shard writer needs neither: it reads the split once, in key order, a shard at a time. So:

1. **Ranges.** The order key is cut into ``R`` ranges of about ``RANGE_BYTES`` of rows each. A
   seeded key is a 63-bit hash, uniform by construction, so its cut points are evenly spaced;
   an unseeded key (the row's identity, a string) is cut at quantiles of a sample drawn from
   every block.
2. **Partition.** One task per group of blocks (about ``GROUP_BYTES``) writes its rows as one
   Parquet file in the run directory's scratch folder, range ``r`` as row group ``r`` (empty
   ones too, so a row group's index is its range), and returns how many rows fell in each
   range. The files are on the run's own storage (local or S3), which every node reaches.
3. **Sort per range, lazily.** :meth:`RangePlan.sort` is one task that reads row group ``r``
   of the files that have rows in it and sorts them: one block of the split in key order.
   The shard writer asks for a range just before it needs it and drops it once its shards are
   written, so a few ranges are in memory at a time.

What the driver holds: the split's block references (it already did), the cut points, and one
row count per (file, range): nothing per row.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("bigopt")

#: Rows per range, in bytes: one range task holds its rows twice (read and sorted).
RANGE_BYTES = 128 * 2**20
#: Rows per partition task and file, in bytes: the task holds them twice (read and reordered).
GROUP_BYTES = 256 * 2**20
#: Keys sampled per block to place an unseeded key's cut points.
SAMPLES_PER_BLOCK = 256
#: Largest value of a seeded order key (``prepare._add_order_key``: a 64-bit hash >> 1).
SEEDED_KEY_END = 2**63


@dataclass
class RangePlan:
    """The partitioned split: scratch files and each range's row count, in key order."""

    fs: Any
    scratch: str
    paths: list[str]
    counts: np.ndarray  # [file, range] rows
    key: str

    @property
    def range_rows(self) -> list[int]:
        return [int(n) for n in self.counts.sum(axis=0)]

    def sort(self, r: int) -> Any:
        """Submit the task that sorts range ``r``; returns its block's ref."""
        from bigopt.data.engine import submit

        files = [p for p, n in zip(self.paths, self.counts[:, r], strict=True) if n]
        return submit(_sort_range, self.fs, files, r, self.key)

    def remove(self) -> None:
        """Delete the scratch folder (its rows are in the shards now)."""
        self.fs.delete_dir(self.scratch)


def block_refs(part: Any) -> list[tuple[Any, int, int]]:
    """A materialized Dataset's non-empty blocks as (ref, rows, bytes), in order."""
    return [(entry.ref, entry.metadata.num_rows, entry.metadata.size_bytes or 0)
            for bundle in part.iter_internal_ref_bundles() for entry in bundle.blocks
            if entry.metadata.num_rows]


def group_blocks(blocks: list[tuple[Any, int, int]], group_bytes: int) -> list[list[Any]]:
    """Block refs ``(ref, rows, bytes)`` in consecutive groups of up to ``group_bytes`` (a block
    larger than that is a group alone): one task's input each."""
    groups: list[list[Any]] = [[]]
    size = 0
    for ref, _, nbytes in blocks:
        if groups[-1] and size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(ref)
        size += nbytes
    return [g for g in groups if g]


def partition(part: Any, fs: Any, scratch: str, key: str, *, seeded: bool,
              range_bytes: int | None = None, group_bytes: int | None = None) -> RangePlan:
    """Write ``part`` (materialized, with the order key ``key``) as range-partitioned Parquet
    files under ``scratch`` on ``fs``; ``seeded``: the key is a uniform 63-bit hash. Sizes
    default to ``RANGE_BYTES`` and ``GROUP_BYTES``, read at call time."""
    import ray

    from bigopt.data.engine import submit, submit_bounded

    blocks = block_refs(part)
    total = sum(b for _, _, b in blocks)
    range_bytes, group_bytes = range_bytes or RANGE_BYTES, group_bytes or GROUP_BYTES
    ranges = max(1, math.ceil(total / range_bytes))
    if seeded:
        cuts: np.ndarray = (np.arange(1, ranges, dtype=np.float64) * (SEEDED_KEY_END / ranges)
                            ).astype(np.int64)
    else:
        samples = np.concatenate(ray.get([submit(_sample_keys, ref, key, SAMPLES_PER_BLOCK)
                                          for ref, _, _ in blocks]) or [np.array([], object)])
        samples.sort()
        cuts = (samples[np.linspace(0, len(samples), ranges + 1)[1:-1].astype(int)]
                if len(samples) else np.array([], object))
    groups = group_blocks(blocks, group_bytes) or [[]]
    fs.delete_dir_contents(scratch, missing_dir_ok=True)
    fs.create_dir(scratch, recursive=True)
    paths = [f"{scratch}/part-{g:05d}.parquet" for g in range(len(groups))]
    try:  # a few groups at a time (``submit_bounded``): not the whole split asked for at once
        written = submit_bounded([(_partition_to_file, fs, paths[g], key, cuts, *refs)
                                  for g, refs in enumerate(groups)])
        counts = np.stack(ray.get([ref for ref, in written])).astype(np.int64)
        rows = sum(n for _, n, _ in blocks)
        if int(counts.sum()) != rows:
            raise RuntimeError(f"data: partitioned {int(counts.sum())} rows of {rows}")
    except BaseException:
        fs.delete_dir(scratch)  # a failed partition leaves no scratch behind
        raise
    log.info("data: %d rows in %d key ranges through %d files", rows, counts.shape[1], len(paths))
    return RangePlan(fs, scratch, paths, counts, key)


def _arrow(block: Any) -> Any:
    """A Ray Data block as an Arrow table (a pandas block converted)."""
    import pyarrow as pa

    return block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)


def _sample_keys(block: Any, key: str, k: int) -> np.ndarray:
    """Ray task body: up to ``k`` of the block's keys, evenly spaced (order keys are hashes or
    identities: any spread of positions is a fair sample of values)."""
    values = _arrow(block).column(key).to_numpy(zero_copy_only=False)
    return values[np.linspace(0, len(values) - 1, min(k, len(values))).astype(int)]


def _partition_to_file(fs: Any, path: str, key: str, cuts: np.ndarray, *blocks: Any) -> np.ndarray:
    """Ray task body: ``blocks`` as one Parquet file, the rows of range ``r`` (keys in
    ``[cuts[r-1], cuts[r])``) as row group ``r``; returns the rows per range."""
    import pyarrow.parquet as pq

    from bigopt.data.engine import concat

    table = concat([_arrow(b) for b in blocks])
    where = np.searchsorted(cuts, table.column(key).to_numpy(zero_copy_only=False), side="right")
    counts = np.bincount(where, minlength=len(cuts) + 1)
    table = table.take(np.argsort(where, kind="stable"))
    starts = np.concatenate([[0], np.cumsum(counts)])
    with pq.ParquetWriter(path, table.schema, filesystem=fs) as writer:
        for r in range(len(counts)):  # an empty range is an empty row group: index == range
            writer.write_table(table.slice(starts[r], counts[r]), row_group_size=max(1, counts[r]))
    return counts


def _sort_range(fs: Any, paths: list[str], r: int, key: str) -> Any:
    """Ray task body: row group ``r`` of each file, as one table sorted by ``key``."""
    import pyarrow.parquet as pq

    from bigopt.data.engine import concat

    parts = []
    for path in paths:
        with fs.open_input_file(path) as f:
            parts.append(pq.ParquetFile(f).read_row_group(r))
    return concat(parts).sort_by(key)
