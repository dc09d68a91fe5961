"""Session 21: the last R trials re-train the best challengers with a new seed (SMAC-style
intensification; ``reevaluate`` / ``reevaluate_top`` of bigopt's searchers) on NAS-Bench-201.

python benchmarks/results/nasbench201_session21_reevaluate.py SEARCHER DATASETS FIRST_SEED SEEDS \
    VARIANTS [--tpe] [--repeats fresh|same] > out.jsonl

SEARCHER: evolution | rl (the spec's defaults, through the search stage's builder); VARIANTS:
';'-separated R:K pairs (R final trials re-train one of the K best challengers). A variant is
the default until trial 100 - R (its re-evaluation branch does nothing before), so each seed
runs the default once and each variant continues from a copy of the searcher taken at trial
100 - R: the same traces as a run with the option set from the start (``--check`` compares
them on a few seeds; for 4:2, against the searcher the spec builds today, whose default it
is). "default" is the searcher without re-evaluation (the spec's default before session 21).
One JSON line per (data set, seed): the best-observed cell's mean accuracy for the default,
each variant and (--tpe) Optuna TPE.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import search_nasbench as sn  # noqa: E402

QUERIES = 100
TABLES: dict[str, sn.Table] = {}


def table(label: str) -> sn.Table:
    if label not in TABLES:
        TABLES[label] = sn.load_table(sn.DATASETS[label])
    return TABLES[label]


def configure(searcher, r: int, k: int) -> None:
    searcher.reevaluate, searcher.reevaluate_top = r, k
    searcher.budget, searcher.seed_key = QUERIES, sn.SEED_KEY


def step(searcher, t: sn.Table, seed: int, i: int, repeats: str) -> tuple[str, float]:
    config = searcher.suggest(f"t{i:05d}")
    acc = sn.evaluate(t, config, seed, i, repeats)
    searcher.on_trial_complete(f"t{i:05d}", {sn.METRIC: acc})
    return sn.cell_key(config), acc


def one(args) -> dict:
    name, label, seed, variants, tpe, repeats = args
    sn._quiet()
    t = table(label)
    searcher = sn.make_searcher(f"{name}-default", seed, QUERIES)
    configure(searcher, 0, 2)  # "default": without re-evaluation (the spec's before session 21)
    branch_at = {QUERIES - r for r, _ in variants}
    snapshots, trace = {}, []
    for i in range(QUERIES):
        if i in branch_at:
            snapshots[i] = (copy.deepcopy(searcher), list(trace))
        trace.append(step(searcher, t, seed, i, repeats))
    out = {"dataset": label, "seed": seed, "default": sn.best_of(trace, t)[0]}
    for r, k in variants:
        branch, partial = copy.deepcopy(snapshots[QUERIES - r])
        configure(branch, r, k)
        rest = [step(branch, t, seed, i, repeats) for i in range(QUERIES - r, QUERIES)]
        out[f"end{r}k{k}"] = sn.best_of(partial + rest, t)[0]
    if tpe:
        out["tpe"] = sn.run_one("tpe", t, seed, QUERIES, repeats)[0]
    return out


def check(name: str, label: str, seeds: range, r: int, k: int, repeats: str) -> None:
    """Branching equals a run with the option set from the start."""
    t = table(label)
    for seed in seeds:
        whole = sn.make_searcher(f"{name}-default", seed, QUERIES)
        if (r, k) != (4, 2):  # the spec's default since session 21: built as a user gets it
            configure(whole, r, k)
        trace = [step(whole, t, seed, i, repeats) for i in range(QUERIES)]
        got = one((name, label, seed, [(r, k)], False, repeats))[f"end{r}k{k}"]
        assert sn.best_of(trace, t)[0] == got, (seed, sn.best_of(trace, t)[0], got)
    print(f"check {name} {label} end{r}k{k} seeds {seeds.start}-{seeds.stop - 1}: identical",
          file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("searcher", choices=["evolution", "rl"])
    p.add_argument("datasets")
    p.add_argument("first", type=int)
    p.add_argument("seeds", type=int)
    p.add_argument("variants")
    p.add_argument("--tpe", action="store_true")
    p.add_argument("--repeats", choices=sn.REPEATS, default="fresh")
    p.add_argument("--check", type=int, default=0, help="seeds to compare against whole runs first")
    p.add_argument("--procs", type=int, default=2)
    a = p.parse_args()
    variants = [tuple(int(x) for x in v.split(":")) for v in a.variants.split(";") if v]
    labels = a.datasets.split(",")
    if a.check:
        for r, k in variants:
            check(a.searcher, labels[0], range(a.first, a.first + a.check), r, k, a.repeats)
    jobs = [(a.searcher, label, s, variants, a.tpe, a.repeats)
            for label in labels for s in range(a.first, a.first + a.seeds)]
    with mp.get_context("fork").Pool(a.procs) as pool:
        for row in pool.imap(one, jobs, chunksize=4):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
