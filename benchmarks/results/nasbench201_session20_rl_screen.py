"""Session 20: RL update rules on NAS-Bench-201 (100 queries, re-drawing harness), paired
against the current RL default and against Optuna TPE on the same seeds.

python benchmarks/results/nasbench201_session20_rl_screen.py "rl;rs20;pqt10" \
    CIFAR-10,ImageNet16-120 10000 150 2

Variants (``RLSearcher`` keyword arguments on top of the search stage's RL defaults: LSTM
policy, 8 candidates ranked by the density ratio): rl = the default (REINFORCE with a moving
baseline); rsQQ = ``update="risk_seeking", risk_quantile=QQ/100``; pqtK = ``update="pqt",
top_k=K``; ``evolution-default``, ``rl-default``: what the search stage builds from a
section left at its defaults (``search_nasbench.make_searcher``); suffixes ``-lrX`` set
``lr``, ``-frN`` ``fresh=N`` (N of the candidates drawn from the good trials' density, as
evolution's), ``-kN`` ``candidates=N``, ``-entX`` ``entropy_weight``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import search_nasbench as sn  # noqa: E402

TABLES: dict[str, sn.Table] = {}


def options(name: str) -> dict:
    opts: dict = {}
    base, *suffixes = name.split("-")
    if base.startswith("rs"):
        opts = {"update": "risk_seeking", "risk_quantile": int(base[2:]) / 100}
    elif base.startswith("pqt"):
        opts = {"update": "pqt", "top_k": int(base[3:])}
    for suffix in suffixes:
        if suffix.startswith("lr"):
            opts["lr"] = float(suffix[2:])
        elif suffix.startswith("fr"):
            opts["fresh"] = int(suffix[2:])
        elif suffix.startswith("k"):
            opts["candidates"] = int(suffix[1:])
        elif suffix.startswith("ent"):
            opts["entropy_weight"] = float(suffix[3:])
    return opts


def searcher(name: str, seed: int):
    if name == "tpe" or name.endswith("-default"):  # Optuna TPE; the stage's own builders
        return sn.make_searcher(name, seed, 100)
    from bigopt.search.rl import RLSearcher
    from bigopt.search.spec import SearchSpec

    defaults = SearchSpec.model_validate({"searcher": "rl"}).rl.model_dump()
    kwargs = {k: v for k, v in defaults.items() if v is not None}
    return RLSearcher(sn.SPACE, sn.METRIC, "max", seed=seed, max_trials=100,
                      **{**kwargs, **options(name)})


def one(args):
    name, dataset, seed = args
    if dataset not in TABLES:
        TABLES[dataset] = sn.load_table(sn.DATASETS[dataset])
    table = TABLES[dataset]
    trace = sn.drive(searcher(name, seed), table, seed, 100)
    return name, dataset, seed, sn.best_of(trace, table)[0]


def main():
    names, datasets = sys.argv[1].split(";"), sys.argv[2].split(",")
    first, n = int(sys.argv[3]), int(sys.argv[4])
    procs = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    if "tpe" not in names:
        names = ["tpe", *names]
    sn._quiet()
    jobs = [(v, d, s) for d in datasets for v in names for s in range(first, first + n)]
    t0 = time.time()
    res: dict[tuple[str, str], dict[int, float]] = {}
    with mp.Pool(procs, initializer=sn._quiet) as pool:
        for v, d, s, acc in pool.imap_unordered(one, jobs, chunksize=5):
            res.setdefault((v, d), {})[s] = acc
    print(f"seeds {first}-{first + n - 1}, 100 queries, re-drawing harness, {time.time() - t0:.0f} s")
    for d in datasets:
        for base in ("tpe", "rl") if "rl" in names else ("tpe",):
            if (base, d) not in res:
                continue
            print(f"\n{d}: paired against {base} ({n} seeds)")
            ref = res[(base, d)]
            for v in names:
                r = res[(v, d)]
                diffs = [r[s] - ref[s] for s in ref]
                mean, se = sn.stats(diffs)
                wins, ties = sum(x > 0 for x in diffs), sum(x == 0 for x in diffs)
                print(f"  {v:16s} acc {statistics.fmean(r.values()):.3f}  - {base}: {mean:+.3f} +- "
                      f"{se:.3f}  ({wins} / {ties} / {len(diffs) - wins - ties})")


if __name__ == "__main__":
    main()
