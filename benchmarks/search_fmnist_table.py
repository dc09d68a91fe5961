"""Searchers on a Fashion-MNIST table: every point of a small architecture x lr grid trained
once with bigopt's own trainer, then random / evolution / RL searches replayed on it.

Real trials of every searcher for many seeds cost hours on 2 cores (BENCHMARKS 6: 100 min for
5 seeds x 3 searchers x 20 trials); a table makes the comparison cheap and exact, as
NAS-Bench-201 does for CIFAR. Part ``build`` runs a Ray Tune grid over the space through
``bigopt.train.trial.tune_trainable`` (the search stage's own trainable: the in-process trainer
on the prepared Fashion-MNIST artifact, validation metrics to Tune, the test split evaluated
into result.json after the last step) and writes one row per point: validation accuracy (what a
searcher sees) and test accuracy (what the comparison scores). Part ``search`` drives each
searcher through the Searcher API (suggest -> on_trial_complete, one trial at a time, as a
Tuner with ``max_concurrent_trials=1`` does) for ``--budget`` trials per seed; per seed the point
with the best validation accuracy is taken and its test accuracy counted.

Space (243 points): a 2-stage CNN, each stage a residual, plain (no skip) or dense block; stage
widths {8, 16, 32} and {16, 32, 64}; lr {2e-3, 1e-2, 5e-2}; 150 steps of 64 rows per point,
scored on the whole validation split.

    python benchmarks/search_fmnist_table.py build           # ~20-40 min on 2 cores
    python benchmarks/search_fmnist_table.py search --seeds 30 --budget 12
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read at `import ray`: loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fmnist_table.json is the first, 108-point table (2 widths a stage, val on 512 rows)
TABLE = os.path.join(REPO, "benchmarks", "results", "fmnist_table_243.json")
BLOCKS = ["resnet", "plain", "dense"]
GRID = {"s0.block": BLOCKS, "s1.block": BLOCKS, "s0.width": [8, 16, 32], "s1.width": [16, 32, 64],
        "lr": [2e-3, 1e-2, 5e-2]}
STEPS = 150


def key_of(point: dict[str, Any]) -> str:
    return "|".join(f"{k}={point[k]}" for k in GRID)


def model_of(point: dict[str, Any]) -> dict[str, Any]:
    from bigopt.search.arch import model_section

    base = {"kind": "cnn", "in_channels": 1, "image_size": 28, "num_classes": 10}
    arch = {"arch.family": "cnn", "arch.depth": 2, "arch.stem": 8}
    for stage in ("s0", "s1"):
        arch[f"arch.{stage}.block"] = point[f"{stage}.block"]
        arch[f"arch.{stage}.width"] = point[f"{stage}.width"]
        arch[f"arch.{stage}.kernel"] = 3
    return model_section(arch, base)


def build(args: argparse.Namespace) -> None:
    import ray
    from ray import tune

    import bigopt
    from bigopt.artifacts import DataArtifact
    from bigopt.runtime import RunDir
    from bigopt.spec import load_spec, with_values
    from bigopt.train.trial import tune_trainable

    storage = args.storage or tempfile.mkdtemp(prefix="bigopt-fmnist-table-")
    spec = load_spec(os.path.join(REPO, "jobs", "search_fmnist.yaml"), [f"storage={storage}"])
    started = time.time()
    data_run = RunDir(bigopt.run(spec, stages=["data"]).run_uri)
    data = DataArtifact.model_validate(data_run.read_json("data/artifact.json"))
    # the whole validation split scores each point (46 x 64 of its ~3,000 rows): with the trial
    # default (8 x 64 = 512 rows) the accuracy's standard error, ~1.8 points, is wider than the
    # gaps between the best architectures, and a searcher would chase noise
    eval_batches = data.splits["val"].rows // 64
    base = with_values(spec.model_copy(update={"search": None}), {
        **spec.search.trial, "train.max_steps": STEPS, "train.eval_every": STEPS,
        "train.eval_batches": eval_batches})
    points = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    if args.limit:  # a timing run
        points = points[:args.limit]
    print(f"{len(points)} points, {STEPS} steps each; data in {time.time() - started:.0f} s", flush=True)

    def to_values(config: dict[str, Any]) -> dict[str, Any]:
        point = config["point"]
        return {"model": model_of(point), "train.lr": point["lr"]}

    trainable = tune_trainable(base, data, to_values=to_values, trials_dir=os.path.join(storage, "grid"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"point": tune.grid_search(points)},
        # reused actors: a finished point's process trains the next (no per-point import of
        # torch and Ray), as the search stage does
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", max_concurrent_trials=2,
                                    reuse_actors=True),
        run_config=tune.RunConfig(storage_path=os.path.join(storage, "tune"), name="grid",
                                  verbose=0))
    results = tuner.fit()
    rows = []
    for result in results:
        point = result.config["point"]
        trial_run = RunDir(result.metrics.get("trial_run"))
        final = trial_run.read_json("train/result.json")
        rows.append({"key": key_of(point), **point, "val_acc": result.metrics.get("val_acc"),
                     "test_acc": final.get("test_accuracy"), "step": result.metrics.get("step")})
    with open(args.table, "w") as f:
        json.dump({"steps": STEPS, "grid": GRID, "rows": sorted(rows, key=lambda r: r["key"]),
                   "seconds": round(time.time() - started, 1)}, f, indent=1)
    print(f"{len(rows)} rows -> {args.table} in {time.time() - started:.0f} s")


def search(args: argparse.Namespace) -> None:
    from ray import tune

    from bigopt.search import EvolutionSearcher, RandomSearcher, RLSearcher

    with open(args.table) as f:
        table = json.load(f)
    grid = table["grid"]
    by_key = {r["key"]: r for r in table["rows"]}
    space = {k: tune.choice(v) for k, v in grid.items()}
    best_val = max(by_key.values(), key=lambda r: r["val_acc"])
    print(f"table: {len(by_key)} points; best val {best_val['val_acc']:.4f} (test "
          f"{best_val['test_acc']:.4f}); best test {max(r['test_acc'] for r in by_key.values()):.4f}; "
          f"median test {statistics.median(r['test_acc'] for r in by_key.values()):.4f}")

    def make(name: str, seed: int) -> Any:
        if name == "random":
            return RandomSearcher(space=space, metric="val_acc", mode="max", seed=seed)
        if name == "random-no-repeats":
            return RandomSearcher(space=space, metric="val_acc", mode="max", seed=seed, dedupe=True)
        if name == "evolution":
            return EvolutionSearcher(space=space, metric="val_acc", mode="max", seed=seed,
                                     population=args.population, tournament=args.tournament)
        return RLSearcher(space=space, metric="val_acc", mode="max", seed=seed)

    scores: dict[str, list[float]] = {}
    for name in ("random", "random-no-repeats", "evolution", "rl"):
        scores[name] = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            searcher = make(name, seed)
            seen: list[dict[str, Any]] = []
            for i in range(args.budget):
                config = searcher.suggest(f"t{i}")
                row = by_key[key_of({k: config[k] for k in grid})]
                seen.append(row)
                searcher.on_trial_complete(f"t{i}", {"val_acc": row["val_acc"]})
            scores[name].append(max(seen, key=lambda r: r["val_acc"])["test_acc"])
    base = scores["random"]
    seeds = f"seeds {args.first_seed}-{args.first_seed + args.seeds - 1}"
    print(f"\n| searcher | mean test acc of the best-by-val point ({seeds}, {args.budget} trials) "
          "| +- s.e. | paired difference vs random, points (+- s.e.) | wins / ties / losses vs "
          "random (same seed) | reading |")
    print("|---|---|---|---|---|---|")
    for name, values in scores.items():
        se = statistics.stdev(values) / len(values) ** 0.5
        diffs = [100 * (a - b) for a, b in zip(values, base, strict=True)]
        diff, diff_se = statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
        wins = sum(d > 0 for d in diffs)
        ties = sum(d == 0 for d in diffs)
        reading = ("-" if name == "random" else "not shown" if abs(diff) <= 1.96 * diff_se
                   else "better" if diff > 0 else "worse")
        print(f"| {name} | {100 * statistics.fmean(values):.2f} % | {100 * se:.2f} | "
              f"{diff:+.2f} +- {diff_se:.2f} | {wins} / {ties} / {len(values) - wins - ties} | "
              f"{reading} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    b = sub.add_parser("build")
    b.add_argument("--storage", default=None)
    b.add_argument("--limit", type=int, default=0, help="only the first N points (timing)")
    s = sub.add_parser("search")
    s.add_argument("--seeds", type=int, default=30)
    s.add_argument("--first-seed", type=int, default=1000,
                   help="reported seeds start here: 0-29 were looked at while choosing settings")
    s.add_argument("--budget", type=int, default=12)
    s.add_argument("--population", type=int, default=6)
    s.add_argument("--tournament", type=int, default=3)
    for part in (b, s):
        part.add_argument("--table", default=TABLE)
    args = ap.parse_args(argv)
    build(args) if args.part == "build" else search(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
