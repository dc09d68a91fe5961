"""Ray Data's shuffle strategies for a groupby, in one process: why the data stage uses the
sort-based pull shuffle (``bigopt.data.prepare.shuffle_strategy``, up to 1 GiB of source).

A dataset of ``--rows`` rows (an id and one of 997 group keys) is grouped into
``--partitions`` partitions and passed through ``map_groups`` ``--repeats`` times with each
strategy (the dataset created anew under each: a Dataset keeps the DataContext it was
created under); per repeat the seconds and the driver's RSS are printed, then the ratio of the
medians.

    python benchmarks/shuffle.py --rows 2000000 --partitions 200 --repeats 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
STRATEGIES = tuple(os.environ.get("BIGOPT_SHUFFLES", "hash_shuffle,sort_shuffle_pull_based").split(","))


def rss_mb() -> int:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    import ray
    from ray.data.context import ShuffleStrategy

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    load_before, medians = os.getloadavg()[0], {}
    for name in STRATEGIES:
        ctx.shuffle_strategy = ShuffleStrategy(name)
        # a Dataset keeps the DataContext it was created under: created after the switch
        ds = ray.data.range(args.rows).map_batches(
            lambda b: {"id": b["id"], "p": b["id"] % 997}).materialize()
        runs = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            out = ds.groupby("p", num_partitions=args.partitions).map_groups(
                lambda g: g, batch_format="numpy").materialize()
            assert out.count() == args.rows
            del out
            gc.collect()
            runs.append({"seconds": round(time.perf_counter() - started, 2), "driver_rss_mb": rss_mb()})
        medians[name] = statistics.median(r["seconds"] for r in runs)
        print(json.dumps({"strategy": name, "rows": args.rows, "partitions": args.partitions,
                          "runs": runs}), flush=True)
    print(json.dumps({"hash_over_sort": round(medians[STRATEGIES[0]] / medians[STRATEGIES[1]], 2),
                      "load_before": load_before, "load_after": os.getloadavg()[0],
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
