"""Steady-state data wait in training, through the CLI as a user runs it (issue 18, 7c).

Each job runs ``bigopt run <job> --set train.max_steps=N`` (defaults otherwise: the
deterministic order, each rank reading its share with a background reader) in a fresh storage.
From ``train/metrics.jsonl``: the share of step time each rank spent waiting for its next batch
(``data_wait_frac_by_rank``, measured by the training loop over each log window), after the
first quarter of the steps (start-up and the reader's first fill left out); the figure is
the slowest rank's mean and the largest single window. Goal: <= 1 %.

    python benchmarks/data_wait.py                                   # quickstart + Fashion-MNIST
    python benchmarks/data_wait.py --jobs jobs/quickstart.yaml --steps 200
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_wait(job: str, steps: int, storage: str) -> dict:
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bigopt.cli", "run", job, "--set",
                           f"storage={storage}", "--set", f"train.max_steps={steps}"],
                          cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    (metrics,) = glob.glob(os.path.join(storage, "*", "*", "train", "metrics.jsonl"))
    rows = [json.loads(line) for line in open(metrics)]
    steady = [r for r in rows if "data_wait_frac_by_rank" in r and r["step"] > steps // 4]
    by_rank = list(zip(*(r["data_wait_frac_by_rank"] for r in steady), strict=True))
    return {"job": job, "steps": steps, "wall_s": round(time.perf_counter() - started, 1),
            "windows": len(steady),
            "mean_wait_by_rank": [round(statistics.fmean(w), 5) for w in by_rank],
            "slowest_rank_mean": round(max(statistics.fmean(w) for w in by_rank), 5),
            "largest_window": round(max(max(w) for w in by_rank), 5),
            "samples_per_s_median": statistics.median(r["samples_per_s"] for r in steady),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="+", default=["jobs/quickstart.yaml", "jobs/fmnist_cnn.yaml"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=None, help="append one JSON line per job here")
    args = parser.parse_args()
    for job in args.jobs:
        with tempfile.TemporaryDirectory() as storage:
            record = data_wait(job, args.steps, storage)
        print(json.dumps(record), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
