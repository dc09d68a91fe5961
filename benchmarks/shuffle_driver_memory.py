"""How much native memory one Ray Data groupby leaves in the driver, by shuffle strategy.

Found at 10M rows (BENCHMARKS 7c): the data stage's driver reached 1.79 GB (RssAnon 1.67 GB)
in near_dedup's verification and clusters, where it was 267 MB at 1M. Python objects (traced),
pyarrow's pool and Ray's in-process memory store account for almost none of it. This probe
isolates one groupby: ``rows`` rows in ``blocks`` materialized blocks, ``groupby(k).count()``
into ``parts`` partitions, then prints the driver's RssAnon before and after, the seconds, and
Ray's in-process memory store. One configuration per process (a fresh Ray each time):

    python benchmarks/shuffle_driver_memory.py 1000000 400 6 sort_shuffle_pull_based
    python benchmarks/shuffle_driver_memory.py 1000000 400 6 hash_shuffle
    LIMIT=1024 python benchmarks/shuffle_driver_memory.py ...   # max_direct_call_object_size

Raw results: ``benchmarks/results/shuffle_driver_memory_session13.txt``.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np


def rss_anon_mb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    import ray
    import ray.data
    from ray.data.context import ShuffleStrategy

    rows, blocks, parts, strategy = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    limit = int(os.environ.get("LIMIT", "-1"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config={} if limit < 0 else {"max_direct_call_object_size": limit})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.shuffle_strategy = ShuffleStrategy(strategy)
    ds = ray.data.range(rows, override_num_blocks=blocks).map_batches(
        lambda b: {"k": b["id"] % 1000003, "v": np.repeat(b["id"][:, None], 8, axis=1)},
        batch_size=None).materialize()
    before = rss_anon_mb()
    started = time.perf_counter()
    groups = ds.groupby("k", num_partitions=parts).count().materialize().count()
    store = ray._private.worker.global_worker.core_worker.get_local_memory_store_bytes_used()
    print(f"rows {rows} blocks {blocks} parts {parts} {strategy} limit {limit}: groups {groups}, "
          f"driver RssAnon {before} -> {rss_anon_mb()} MB, {time.perf_counter() - started:.1f} s, "
          f"in-process store {store // 2**20} MB", flush=True)


if __name__ == "__main__":
    main()
