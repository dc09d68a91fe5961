"""Session 19: NAS-Bench-201 at 100 queries when a repeated cell returns the number it
returned before, as a bigopt trial does (a trial's seed is the spec's, so the same
configuration trains the same model; ``search_nasbench.evaluate(..., repeats="same")``), against
the usual harness (each query draws a recorded
seed by the trial's index, so a repeated cell is a fresh training run).

python benchmarks/results/nasbench201_session19_repeats.py "tpe;evolution-default" CIFAR-10 20000 1000 2

Prints per searcher: mean accuracy of the best-observed cell, distinct cells queried, and the
paired difference against the first searcher with its standard error, under both harnesses.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import search_nasbench as sn  # noqa: E402

TABLES: dict[str, sn.Table] = {}


def one(args):
    name, dataset, seed, queries, harness = args
    if dataset not in TABLES:
        TABLES[dataset] = sn.load_table(sn.DATASETS[dataset])
    table = TABLES[dataset]
    trace = sn.drive(sn.make_searcher(name, seed, queries), table, seed, queries,
                     "same" if harness == "repeat-same" else "fresh")
    acc, _ = sn.best_of(trace, table)
    return name, dataset, harness, seed, acc, len({k for k, _ in trace})



def main():
    names, datasets = sys.argv[1].split(";"), sys.argv[2].split(",")
    first, n = int(sys.argv[3]), int(sys.argv[4])
    procs = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    harnesses = ["fresh-draw", "repeat-same"]
    sn._quiet()
    jobs = [(v, d, s, 100, h) for h in harnesses for d in datasets for v in names
            for s in range(first, first + n)]
    t0 = time.time()
    res: dict[tuple[str, str, str], dict[int, tuple[float, int]]] = {}
    with mp.Pool(procs, initializer=sn._quiet) as pool:
        for v, d, h, s, acc, distinct in pool.imap_unordered(one, jobs, chunksize=10):
            res.setdefault((v, d, h), {})[s] = (acc, distinct)
    print(f"seeds {first}-{first + n - 1}, 100 queries, {time.time() - t0:.0f} s")
    for h in harnesses:
        for d in datasets:
            base = res[(names[0], d, h)]
            print(f"\n{d}, harness {h}: paired against {names[0]}")
            for v in names:
                r = res[(v, d, h)]
                diffs = [r[s][0] - base[s][0] for s in base]
                se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
                print(f"  {v:22s} {statistics.fmean(a for a, _ in r.values()):.3f}  "
                      f"{statistics.fmean(diffs):+.4f} +- {se:.4f}  distinct cells "
                      f"{statistics.fmean(c for _, c in r.values()):.1f}")


if __name__ == "__main__":
    main()
