"""Start-up, data order and shuffling, measured through the CLI as a user runs it.

Part a: time to the first optimizer step, by phase (``startup_s`` in ``train/result.json``:
seconds from the ``bigopt`` process's start to each mark), for ``bigopt train --from data=RUN``
(data prepared) and for ``bigopt run`` from raw data. A cross-check is the wall time from
launching the command to its ``step 1/`` console line.

Part b: what the reproducible default order costs: quickstart throughput (samples/s over the
last log windows) with ``data_order: deterministic`` (default) against ``streaming``, runs
interleaved so both see the same load; ratio deterministic / streaming.

Part c: what shuffling does: the quickstart trained with its rows shuffled when written
(``data.shuffle_seed: 0``, default) against source order (``data.shuffle_seed: null``):
validation loss at the end, and throughput.

    python benchmarks/startup.py                  # all parts, about 15 minutes on 2 cores
    python benchmarks/startup.py --parts a        # start-up only (about 4 minutes)
"""

from __future__ import annotations

import argparse
import glob
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
BIGOPT = [sys.executable, "-m", "bigopt.cli"]
QUIET = ["--set", "train.eval_every=1000", "--set", "train.checkpoint_every=1000"]


def run(args: list[str], storage: str, env: dict[str, str] | None = None,
        ) -> tuple[dict[str, Any], float | None, str]:
    """Run a bigopt command; returns (result.json, seconds to the 'step 1/' line, run dir)."""
    started = time.time()
    proc = subprocess.Popen([*BIGOPT, *args, "--set", f"storage={storage}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    first = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if first is None and "step 1/" in line:
            first = time.time() - started
    if proc.wait() != 0:
        raise RuntimeError("".join(lines[-30:]))
    (result,) = glob.glob(os.path.join(storage, "*", "*", "train", "result.json")) or [None]
    out = json.load(open(result)) if result else {}
    return out, first, os.path.dirname(os.path.dirname(result)) if result else ""


def throughput(run_dir: str, windows: int = 5) -> float:
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "train", "metrics.jsonl"))]
    tail = [r["samples_per_s"] for r in rows if "samples_per_s" in r][-windows:]
    return statistics.median(tail)


def part_a(tmp: str, repeats: int) -> dict[str, Any]:
    _, _, _ = run(["data", "jobs/quickstart.yaml"], f"{tmp}/prep")
    (manifest,) = glob.glob(f"{tmp}/prep/*/*/data/manifest.json")
    prepared = os.path.dirname(os.path.dirname(manifest))
    out: dict[str, Any] = {}
    for name, args in (
        ("prepared", ["train", "jobs/quickstart.yaml", "--from", f"data={prepared}"]),
        ("raw", ["run", "jobs/quickstart.yaml"]),
        # a machine DeepSpeed never built an op on: an empty torch extensions directory (the
        # embedded Ray's workers inherit it), a new storage (no prepared-data cache)
        ("fresh", ["run", "jobs/quickstart.yaml"]),
    ):
        results = []
        for i in range(repeats):
            env = {"TORCH_EXTENSIONS_DIR": tempfile.mkdtemp(prefix="ext-", dir=tmp)} \
                if name == "fresh" else None
            result, first_line, _ = run([*args, "--set", "train.max_steps=3", "--set",
                                         "train.log_every=1", *QUIET], f"{tmp}/{name}{i}", env)
            # what DeepSpeed built there: nothing, for a job without optimizer offload
            built = sorted(os.listdir(env["TORCH_EXTENSIONS_DIR"])) if env else None
            results.append({"ops_built": built, "first_step_s": result["time_to_first_step_s"],
                            "first_line_s": first_line, "marks": result["startup_s"]})
            print(f"a {name} #{i}: ops built {built}, first step {result['time_to_first_step_s']:.1f} s "
                  f"(console line {first_line:.1f} s) {result['startup_s']}", flush=True)
        marks = sorted({k for r in results for k in r["marks"]},
                       key=lambda k: statistics.median(r["marks"].get(k, 0) for r in results))
        out[name] = {"runs": results,
                     "median_first_step_s": statistics.median(r["first_step_s"] for r in results),
                     "best_first_step_s": min(r["first_step_s"] for r in results),
                     "median_marks_s": {k: round(statistics.median(r["marks"][k] for r in results
                                                                   if k in r["marks"]), 2)
                                        for k in marks}}
    return out


def part_b(tmp: str, repeats: int, steps: int) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"deterministic": [], "streaming": []}
    for i in range(repeats):
        for order in rates:  # interleaved: both see the same load
            _, _, run_dir = run(["run", "jobs/quickstart.yaml", "--set", f"train.max_steps={steps}",
                                 "--set", f"train.data_order={order}", *QUIET], f"{tmp}/b-{order}{i}")
            rates[order].append(throughput(run_dir))
            print(f"b {order} #{i}: {rates[order][-1]:.1f} samples/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"samples_per_s": rates, "median": med,
            "ratio_deterministic_over_streaming": med["deterministic"] / med["streaming"]}


def part_c(tmp: str, steps: int) -> dict[str, Any]:
    out = {}
    for name, value in (("shuffled", "0"), ("source_order", "null")):
        result, _, run_dir = run(["run", "jobs/quickstart.yaml", "--set", f"train.max_steps={steps}",
                                  "--set", f"data.shuffle_seed={value}"], f"{tmp}/c-{name}")
        val = {int(k): v for k, v in result["val_losses"].items()}
        out[name] = {"val_loss_start": val[min(val)], "val_loss_end": val[max(val)],
                     "samples_per_s": throughput(run_dir)}
        print(f"c {name}: val loss {val[min(val)]:.4f} -> {val[max(val)]:.4f}, "
              f"{out[name]['samples_per_s']:.1f} samples/s", flush=True)
    out["throughput_ratio_shuffled_over_source_order"] = (
        out["shuffled"]["samples_per_s"] / out["source_order"]["samples_per_s"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="abc")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=60, help="steps per run in part b")
    p.add_argument("--shuffle-steps", type=int, default=300, help="steps per run in part c")
    p.add_argument("--out", default="runs/benchmarks/startup.json")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bigopt-startup-")
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                          "load_avg_start": os.getloadavg()},
                              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if "a" in args.parts:
        report["a_startup"] = part_a(tmp, args.repeats)
    if "b" in args.parts:
        report["b_order"] = part_b(tmp, max(1, args.repeats - 1), args.steps)
    if "c" in args.parts:
        report["c_shuffle"] = part_c(tmp, args.shuffle_steps)
    report["machine"]["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "a_startup"} | {
        "a_startup": {k: {kk: vv for kk, vv in v.items() if kk != "runs"}
                      for k, v in report.get("a_startup", {}).items()}}, indent=2))


if __name__ == "__main__":
    main()
