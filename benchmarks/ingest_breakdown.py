"""Where Ray Data's read of prepared shards loses to pyarrow (issue 18, 7(a)): one process,
medians of 3 interleaved repeats over the same files, seconds.

    python benchmarks/ingest_breakdown.py <run>/data/train

- ``arrow``: ``pyarrow.parquet.read_table`` of each file (the 7(a) baseline), and with one thread;
- ``tasks_count``: the files decoded in 8 plain Ray tasks (no data returned): the decode floor;
- ``tasks_yield``: the same tasks yielding each table (streaming generator), the driver
  ``ray.get``-ing them: Ray core without Ray Data;
- ``read_shards``: bigopt's Ray Data read (``bigopt.data.ingest.read_shards``) streamed with
  ``iter_batches(batch_size=None)`` under Ray Data's defaults, without its USS polling, with a
  larger streaming-generator buffer, and with ``prefetch_batches`` 0 / 4;
- ``read_shards_combined``: the same with each block's chunks combined in the read task (one
  chunk per column: Ray's Arrow pickling and the driver's deserializing work per chunk);
- ``bundles_no_fetch``: Ray Data's read with no block fetched by the driver (metadata only).

Raw output of the session-13 run: ``benchmarks/results/ingest_breakdown_session13.txt``.
"""

from __future__ import annotations

import glob
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
COLUMNS = ["input_ids", "labels"]


def main() -> None:
    import pyarrow.parquet as pq
    import ray
    import ray.data

    from bigopt.data.ingest import read_shards

    train_dir = sys.argv[1]
    files = sorted(glob.glob(os.path.join(train_dir, "*.parquet")))
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False

    @ray.remote
    def count(group: list[str]) -> int:
        return sum(pq.read_table(f, columns=COLUMNS, use_threads=False).num_rows for f in group)

    @ray.remote(num_returns="streaming")
    def tables(group: list[str]):
        for f in group:
            yield pq.read_table(f, columns=COLUMNS, use_threads=False)

    groups = [list(g) for g in np.array_split(files, 8)]

    def tasks_yield() -> int:
        n = 0
        for gen in [tables.remote(g) for g in groups]:
            for ref in gen:
                n += ray.get(ref).num_rows
        return n

    def streamed(**iter_kwargs) -> Callable[[], int]:
        return lambda: sum(b.num_rows for b in read_shards(train_dir, columns=COLUMNS).iter_batches(
            batch_size=None, batch_format="pyarrow", **iter_kwargs))

    def combined() -> int:  # one chunk per column per block, made in the read task (fused)
        ds = read_shards(train_dir, columns=COLUMNS).map_batches(
            lambda t: t.combine_chunks(), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
        return sum(b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))

    def bundles_no_fetch() -> int:
        return sum(rb.num_rows() for rb in read_shards(train_dir, columns=COLUMNS)
                   .iter_internal_ref_bundles())

    defaults = {"memory_usage_poll_interval_s": ctx.memory_usage_poll_interval_s,
                "_max_num_blocks_in_streaming_gen_buffer": ctx._max_num_blocks_in_streaming_gen_buffer}
    reads: dict[str, tuple[Callable[[], int], dict]] = {
        "arrow": (lambda: sum(pq.read_table(f, columns=COLUMNS).num_rows for f in files), {}),
        "arrow_one_thread": (lambda: sum(pq.read_table(f, columns=COLUMNS, use_threads=False).num_rows
                                         for f in files), {}),
        "tasks_count": (lambda: sum(ray.get([count.remote(g) for g in groups])), {}),
        "tasks_yield": (tasks_yield, {}),
        "read_shards": (streamed(), {}),
        "read_shards_no_uss_poll": (streamed(), {"memory_usage_poll_interval_s": None}),
        "read_shards_gen_buffer_16": (streamed(), {"_max_num_blocks_in_streaming_gen_buffer": 16}),
        "read_shards_prefetch_0": (streamed(prefetch_batches=0), {}),
        "read_shards_prefetch_4": (streamed(prefetch_batches=4), {}),
        "read_shards_combined": (combined, {}),
        "bundles_no_fetch": (bundles_no_fetch, {}),
    }
    read_shards(files[:1], columns=COLUMNS).materialize()  # workers and imports warm
    ray.get([count.remote(g[:1]) for g in groups])
    times: dict[str, list[float]] = {name: [] for name in reads}
    for _ in range(3):
        for name, (read, settings) in reads.items():
            for key, value in {**defaults, **settings}.items():
                setattr(ctx, key, value)
            started = time.perf_counter()
            n = read()
            times[name].append(time.perf_counter() - started)
            assert n == rows, (name, n, rows)
    arrow = statistics.median(times["arrow"])
    print(f"{len(files)} files, {rows} rows, {os.cpu_count()} CPUs")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"{name:28s} {median:6.2f} s  ratio {arrow / median:4.2f}  {[round(t, 2) for t in ts]}")


if __name__ == "__main__":
    main()
