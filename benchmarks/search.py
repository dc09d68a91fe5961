"""Searchers against random search, on real training runs and on NAS-Bench-201's tables.

Part fmnist: architecture + lr search on Fashion-MNIST through bigopt's own search stage (the
space of ``jobs/search_fmnist.yaml``: cnn stages of residual / plain / dense / transformer blocks,
or an MLP; widths, kernels, heads, depth, lr). Every searcher gets the same trial budget, the same
prepared data and the same short trials; per seed, the best trial by validation accuracy is
taken, and its **test** accuracy (the 10,000 t10k rows, never seen by the search) is what the
table compares: mean and standard error over seeds, and the per-seed differences to random.

Part fmnist-table: ``benchmarks/search_fmnist_table.py`` (every point of a 243-point CNN x lr
grid trained once, then random / evolution / RL replayed on it over 30 seeds: BENCHMARKS 6b).

Part nasbench: ``benchmarks/search_nasbench.py`` (100 queries of NAS-Bench-201's recorded runs,
evolution / RL / random / Optuna TPE through the same Searcher API Tune drives).

    python benchmarks/search.py fmnist --seeds 5 --trials 20      # ~25 min on 2 cores
    python benchmarks/search.py nasbench                          # see search_nasbench.py
    python benchmarks/search.py fmnist-table build                # ~27 min on 2 cores
    python benchmarks/search.py fmnist-table search --budget 20   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCHERS = ("random", "evolution", "rl")


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return mean, se


def fmnist(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import pyarrow.parquet as pq

    import bigopt
    from bigopt.runtime import RunDir
    from bigopt.spec import load_spec

    storage = args.storage or tempfile.mkdtemp(prefix="bigopt-search-bench-")
    common = [f"storage={storage}", f"search.num_trials={args.trials}",
              f"search.trial.train.max_steps={args.steps}", f"data.source.max_rows={args.rows}"]
    spec = load_spec(os.path.join(REPO, "jobs", "search_fmnist.yaml"), common)
    started = time.time()
    data_run = bigopt.run(spec, stages=["data"]).run_uri
    table: dict[str, list[dict[str, Any]]] = {s: [] for s in args.searchers}
    for seed in range(args.seeds):
        for searcher in args.searchers:
            one = load_spec(os.path.join(REPO, "jobs", "search_fmnist.yaml"),
                            [*common, f"search.searcher={searcher}", f"search.seed={seed}"])
            t0 = time.time()
            run = RunDir(bigopt.run(one, stages=["search"], inputs_from={"data": data_run}).run_uri)
            summary = run.read_json("search/summary.json")
            rows = pq.read_table(run.sub("search/trials.parquet")).to_pylist()
            best = next(r for r in rows if r["trial_id"] == summary["best"]["trial_id"])
            result = RunDir(best["trial_run"]).read_json("train/result.json")
            ran = [r for r in rows if r["status"] != "REJECTED"]
            entry = {"seed": seed, "best_val_acc": summary["best"]["metric"],
                     "test_acc": result["test_accuracy"], "params": best["params"],
                     "config": json.loads(best["config"]), "rejected": summary["rejected"],
                     "distinct_models": len({r["config"] for r in ran}),
                     "mean_val_acc": statistics.fmean(r["metric"] for r in ran if r["metric"] is not None),
                     "seconds": round(time.time() - t0, 1)}
            table[searcher].append(entry)
            print(f"seed {seed} {searcher:9s} best val {entry['best_val_acc']:.4f} test "
                  f"{entry['test_acc']:.4f} ({entry['distinct_models']} distinct models, "
                  f"{entry['seconds']} s)", flush=True)
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "command": " ".join(["python", "benchmarks/search.py", *sys.argv[1:]]),
           "trials": args.trials, "trial_steps": args.steps, "rows": args.rows,
           "seconds": round(time.time() - started), "results": table}
    print(f"\nFashion-MNIST, {args.trials} trials of {args.steps} steps per search, "
          f"{args.seeds} seeds; test accuracy of the best-by-validation trial")
    print("| searcher | test acc, mean +- s.e. | best val acc | mean val acc of all trials | "
          "wins vs random (seeds) |")
    print("|---|---|---|---|---|")
    rand = [e["test_acc"] for e in table.get("random", [])]
    for searcher, entries in table.items():
        test = [e["test_acc"] for e in entries]
        m, se = _mean_se(test)
        vm, vse = _mean_se([e["best_val_acc"] for e in entries])
        am, _ = _mean_se([e["mean_val_acc"] for e in entries])
        wins = (f"{sum(t > r for t, r in zip(test, rand, strict=False))}/{len(test)}"
                if rand and searcher != "random" else "-")
        print(f"| {searcher} | {100 * m:.2f} +- {100 * se:.2f} | {100 * vm:.2f} +- {100 * vse:.2f} | "
              f"{100 * am:.2f} | {wins} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    f = sub.add_parser("fmnist", help="real search on Fashion-MNIST")
    f.add_argument("--seeds", type=int, default=5)
    f.add_argument("--trials", type=int, default=20)
    f.add_argument("--steps", type=int, default=150, help="training steps per trial")
    f.add_argument("--rows", type=int, default=20000, help="data.source.max_rows")
    f.add_argument("--searchers", nargs="+", default=list(SEARCHERS))
    f.add_argument("--storage", default=None)
    f.add_argument("--json", default=None, help="write the raw results here")
    sub.add_parser("nasbench", help="NAS-Bench-201 tables (benchmarks/search_nasbench.py)",
                   add_help=False)
    sub.add_parser("fmnist-table", help="the Fashion-MNIST table: build, then replay searchers "
                   "(benchmarks/search_fmnist_table.py)", add_help=False)
    args, rest = parser.parse_known_args()
    if args.part == "fmnist":
        fmnist(args)
    else:
        script = {"nasbench": "search_nasbench.py", "fmnist-table": "search_fmnist_table.py"}
        sys.exit(subprocess.call([sys.executable, os.path.join(REPO, "benchmarks",
                                                               script[args.part]), *rest]))


if __name__ == "__main__":
    main()
