"""Training benchmarks: bigopt against plain PyTorch, and ZeRO stages / pipeline on memory.

Part a: step time of bigopt with 1 Ray Train worker (strategy ddp, and deepspeed ZeRO-0)
against a plain PyTorch loop on the same GPT, batch, AdamW settings and thread count, in fp32
and bf16. bigopt's step time comes from its own ``train/metrics.jsonl`` (``step_time_s`` per
window of ``log_every`` steps, warm-up windows dropped). The plain loop runs in a separate
process *during* each bigopt run and every bigopt window is compared with the plain steps
that ran in the same seconds: on a machine shared with other jobs, sequential measurements
differ by more than the 5 % being measured, while concurrent ones see the same load.

Part b: 2 workers, a ~38M-parameter GPT in bf16, ZeRO 0/1/2/3 (+ CPU offload) and a 2-stage
pipeline, on throughput (samples/s) and on memory per worker: peak RSS from metrics.jsonl,
and the model-state tensors a rank holds, counted in the worker by a probe (train_probe.py).

Every ratio is against a baseline measured in the same run: the plain loop (a), ZeRO-0 (b).

    python benchmarks/train.py                 # full: about 15 minutes on 2 cores
    python benchmarks/train.py --quick         # a short version (fewer steps and configs)
    python benchmarks/train.py --part b --configs z0,z3   # a subset
    python benchmarks/train.py --part b --malloc-mmap-threshold 131072   # RSS follows live memory

Runs go to ``--storage`` (default ``runs/benchmarks``); checkpoints are deleted after each
run, metrics are kept, and every number printed is also written to ``results-*.json`` there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Read when `ray` is first imported: keep this benchmark's Ray on 127.0.0.1.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
QUICKSTART = REPO / "jobs" / "quickstart.yaml"

# ----------------------------------------------------------------------------- settings
# Part a: the quickstart model (4 layers, d_model 128, context 128, batch 16) on 1 worker.
A_COMMON = ["cluster.num_workers=1", "cluster.cpus_per_worker=1", "train.zero.stage=0",
            "train.eval_every=0", "train.eval_batches=2", "train.checkpoint_every=0",
            "train.schedule.warmup_steps=5"]
A_RUNS = {  # name -> (plain-loop baseline it is compared with, overrides)
    "bigopt ddp fp32": ("plain fp32", ["train.strategy=ddp", "train.precision=fp32"]),
    "bigopt deepspeed z0 fp32": ("plain fp32",
                                 ["train.strategy=deepspeed", "train.precision=fp32"]),
    "bigopt ddp bf16": ("plain autocast-bf16", ["train.strategy=ddp", "train.precision=bf16"]),
    "bigopt deepspeed z0 bf16": ("plain bf16+fp32-master",
                                 ["train.strategy=deepspeed", "train.precision=bf16"]),
}
PLAIN_MODES = {  # what each plain loop does, mirroring the bigopt run it is compared with
    "plain fp32": "fp32",
    "plain autocast-bf16": "autocast",  # = bigopt ddp bf16 (DDPEngine uses torch.autocast)
    "plain bf16+fp32-master": "master",  # = DeepSpeed bf16: bf16 weights/grads, fp32 master+Adam
}

# Part b: ~38M parameters (12 x 12 d^2 + embeddings), so model states (16 bytes/param in mixed
# precision, ~600 MB) dominate the activations (short context, batch 4 per rank).
B_MODEL = ["model.n_layer=12", "model.n_head=8", "model.d_model=512", "model.context=128"]
B_QUICK_MODEL = ["model.n_layer=4", "model.n_head=8", "model.d_model=512", "model.context=128"]
# eval_batches 4: a pipeline eval needs >= micro_batches batches (bigopt bug, BENCHMARKS.md).
B_COMMON = ["cluster.num_workers=2", "cluster.cpus_per_worker=1", "train.strategy=deepspeed",
            "train.precision=bf16", "train.eval_every=0", "train.eval_batches=4",
            "train.checkpoint_every=0", "train.schedule.warmup_steps=2"]
B_RUNS = {  # name -> overrides; global batch 8 samples/step everywhere
    "z0": ["train.zero.stage=0", "train.batch_size=4"],
    "z1": ["train.zero.stage=1", "train.batch_size=4"],
    "z2": ["train.zero.stage=2", "train.batch_size=4"],
    "z3": ["train.zero.stage=3", "train.batch_size=4"],
    "z2+offload-opt": ["train.zero.stage=2", "train.zero.offload_optimizer=true",
                       "train.batch_size=4"],
    "z3+offload-opt+params": ["train.zero.stage=3", "train.zero.offload_optimizer=true",
                              "train.zero.offload_params=true", "train.batch_size=4"],
    # dp = 1: 4 micro-batches of 2 per step = 8 samples, as above.
    "pp2": ["train.zero.stage=0", "train.pipeline.stages=2",
            "train.pipeline.micro_batches=4", "train.batch_size=2"],
}
B_QUICK_RUNS = ["z0", "z3", "pp2"]


def paper_bytes_per_param(name: str, n: int) -> float | None:
    """ZeRO paper (Rajbhandari et al. 2020, Fig. 1), mixed precision, K = 12, N ranks.

    Baseline DP (2 + 2 + K) Psi; P_os 2 Psi + 2 Psi + K Psi / N; P_os+g 2 Psi + (2 + K) Psi / N;
    P_os+g+p (2 + 2 + K) Psi / N. Offload moves states to host RAM: on a CPU-only machine that
    is the same memory, so the prediction for RSS is the stage's own figure.
    """
    k = 12
    stage = {"z0": 0, "z1": 1, "z2": 2, "z3": 3, "z2+offload-opt": 2,
             "z3+offload-opt+params": 3}.get(name)
    if name.startswith("pp"):
        return 2 + 2 + k  # every stage keeps all states of its own layers (Psi = local params)
    if stage is None:
        return None
    return [2 + 2 + k, 4 + k / n, 2 + (2 + k) / n, (2 + 2 + k) / n][stage]


# ----------------------------------------------------------------------------- helpers
def load1() -> float:
    return round(os.getloadavg()[0], 2)


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    import torch

    return {"cpu": info.get("Model name", "?").strip(), "cores": os.cpu_count(),
            "avx512_bf16": "avx512_bf16" in info.get("Flags", ""),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}


def steady_windows(rows: list[dict[str, Any]], warmup: int,
                   cpu: bool = False) -> list[tuple[int, float]]:
    """(steps, mean step seconds) of each logged window that starts after ``warmup`` steps.

    Wall seconds from bigopt's ``step_time_s``; with ``cpu``, CPU seconds from the probe's
    cumulative ``cpu_total_s``.
    """
    out, prev = [], {"step": 0, "cpu_total_s": 0.0}
    for r in sorted(rows, key=lambda r: r["step"]):
        n = r["step"] - prev["step"]
        if prev["step"] >= warmup:
            seconds = (r["cpu_total_s"] - prev["cpu_total_s"]) / n if cpu else r["step_time_s"]
            out.append((n, seconds))
        prev = r
    if not out:
        raise ValueError(f"no log point after {warmup} warm-up steps: raise train.max_steps")
    return out


def summarize(windows: list[tuple[int, float]]) -> dict[str, float]:
    times = [t for _, t in windows]
    steps = sum(n for n, _ in windows)
    return {"median_s": statistics.median(times), "min_s": min(times),
            "mean_s": sum(n * t for n, t in windows) / steps, "steps": steps}


def prepare_data(storage: Path) -> str:
    """Quickstart data (stdlib .py files, context 128), prepared once and reused afterwards."""
    import bigopt

    run_dir = storage / "data"
    if (run_dir / "data" / "manifest.json").exists():
        print(f"data: reusing {run_dir}/data", flush=True)
        return str(run_dir)
    spec = bigopt.load_spec(QUICKSTART)
    started = time.time()
    bigopt.run(spec, stages=["data"], run_dir=str(run_dir))
    print(f"data: prepared in {time.time() - started:.0f} s -> {run_dir}/data", flush=True)
    return str(run_dir)


def run_bigopt(name: str, overrides: list[str], data_dir: str, storage: Path) -> dict[str, Any]:
    """One ``bigopt.run(spec, stages=["train"])`` in a fresh run dir holding a copy of the data."""
    import bigopt
    from bigopt.runtime import RunDir

    spec = bigopt.load_spec(QUICKSTART, overrides=overrides)
    run = RunDir.create(str(storage), "train")
    shutil.copytree(Path(data_dir) / "data", Path(run.path) / "data")
    load_before, started = load1(), time.time()
    print(f"[{name}] bigopt.run in {run.uri} ...", flush=True)
    result = {"name": name, "overrides": overrides, "run_dir": run.uri, "rows": []}
    try:
        bigopt.run(spec, stages=["train"], run_dir=run.uri)
        result["rows"] = run.read_jsonl("train/metrics.jsonl")
    except Exception as exc:  # one failed config must not lose the others' numbers
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        print(f"[{name}] FAILED: {result['error']}", flush=True)
    shutil.rmtree(Path(run.path) / "train" / "checkpoints", ignore_errors=True)
    result.update(wall_s=time.time() - started, load=[load_before, load1()])
    print(f"[{name}] done in {result['wall_s']:.0f} s (load {load_before} -> {load1()})",
          flush=True)
    return result


# ----------------------------------------------------------------------------- part a
def worker_threads() -> dict[str, Any]:
    """Threads and niceness of a 1-CPU Ray actor.

    Ray sets OMP_NUM_THREADS from the actor's CPU count, and starts workers at nice 15
    (RAY_worker_niceness): on a busy machine a normal-priority loop would get more CPU.
    """
    import ray

    @ray.remote(num_cpus=1)
    class Probe:
        def threads(self) -> dict[str, Any]:
            import torch

            return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "torch_threads": torch.get_num_threads(), "nice": os.nice(0)}

    actor = Probe.remote()
    try:
        return ray.get(actor.threads.remote())
    finally:
        ray.kill(actor)


def paired_ratios(rows: list[dict[str, Any]], plain: list[dict[str, float]],
                  warmup: int) -> dict[str, Any]:
    """bigopt / plain per bigopt log window, the plain steps being those that ran meanwhile.

    Both loops run at the same time on the 2 cores, so background load from other jobs
    slows both alike and cancels in the ratio, which sequential runs cannot offer here.
    """
    windows, prev = [], None
    for r in sorted(rows, key=lambda r: r["step"]):
        if prev is not None and prev["step"] >= warmup:
            n = r["step"] - prev["step"]
            inside = [p for p in plain if prev["unix_time"] < p["t"] <= r["unix_time"]]
            if len(inside) >= 3:
                windows.append({
                    "steps": n, "bigopt_wall": r["step_time_s"],
                    "bigopt_cpu": (r["cpu_total_s"] - prev["cpu_total_s"]) / n,
                    "plain_wall": statistics.fmean(p["wall"] for p in inside),
                    "plain_cpu": statistics.fmean(p["cpu"] for p in inside),
                    "plain_steps": len(inside)})
        prev = r
    if not windows:
        raise ValueError("no bigopt log window overlapped enough plain-loop steps")
    out: dict[str, Any] = {"windows": windows}
    for kind in ("wall", "cpu"):
        ratios = [w[f"bigopt_{kind}"] / w[f"plain_{kind}"] for w in windows]
        out[f"{kind}_ratio"] = statistics.median(ratios)
        out[f"{kind}_ratio_range"] = [min(ratios), max(ratios)]
        out[f"bigopt_{kind}_s"] = statistics.median(w[f"bigopt_{kind}"] for w in windows)
        out[f"plain_{kind}_s"] = statistics.median(w[f"plain_{kind}"] for w in windows)
    return out


def part_a(args: argparse.Namespace, data_dir: str, storage: Path) -> dict[str, Any]:
    steps, log_every, warmup = (30, 10, 10) if args.quick else (50, 10, 10)
    common = A_COMMON + [f"train.max_steps={steps}", f"train.log_every={log_every}"]
    threads = worker_threads()
    n_threads = int(threads["torch_threads"])
    print(f"part a: Ray worker {threads}; the plain loop uses torch.set_num_threads"
          f"({n_threads}) and the same niceness", flush=True)
    results: dict[str, Any] = {"threads": threads, "steps": steps, "warmup": warmup,
                               "bigopt": {}}
    for name, (base, overrides) in A_RUNS.items():
        # The plain loop runs in its own process for the whole bigopt run; only the steps it
        # took during bigopt's steady log windows are compared.
        out, stop = storage / "plain-steps.jsonl", storage / "plain-stop"
        stop.unlink(missing_ok=True)
        cfg = {"mode": PLAIN_MODES[base], "spec": str(QUICKSTART), "overrides": common,
               "data_dir": data_dir,
               "threads": n_threads, "nice": int(threads["nice"]), "out": str(out),
               "stop": str(stop),
               "started": time.time(), "max_s": 1200}
        proc = subprocess.Popen([sys.executable, str(HERE / "plain_loop.py"), json.dumps(cfg)])
        try:
            r = run_bigopt(name, common + overrides, data_dir, storage)
        finally:
            stop.touch()
            proc.wait(timeout=120)
        results["bigopt"][name] = r
        if "error" in r:
            continue
        plain = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        r["baseline"] = base
        r["paired"] = paired_ratios(r["rows"], plain, warmup)
        r["data_wait_frac"] = statistics.fmean(
            row["data_wait_frac"] for row in r["rows"] if row["step"] > warmup)
        p = r["paired"]
        print(f"[{name}] wall ratio {p['wall_ratio']:.3f} (windows {p['wall_ratio_range']}), "
              f"CPU ratio {p['cpu_ratio']:.3f}", flush=True)
    return results


def table_a(res: dict[str, Any]) -> str:
    """bigopt / plain, each window against the plain steps that ran during it (median).

    CPU ratio first: process CPU seconds per step are what load from other jobs moves least.
    The wall ratio also depends on how the kernel splits the cores between the two loops
    (a loop that blocks now and then, as bigopt's does on its data queue, is favoured).
    """
    lines = ["| run | compared with | bigopt CPU ms | plain CPU ms | **CPU ratio** "
             "| bigopt wall ms | plain wall ms | wall ratio | wall window range | data wait "
             "| load 1m |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["bigopt"].items():
        if "error" in r:
            lines.append(f"| {name} | FAILED: {r['error']} |||||||||")
            continue
        p = r["paired"]
        lo, hi = p["wall_ratio_range"]
        lines.append(
            f"| {name} | {r['baseline']} | {1e3 * p['bigopt_cpu_s']:.1f} "
            f"| {1e3 * p['plain_cpu_s']:.1f} | **{p['cpu_ratio']:.3f}** "
            f"| {1e3 * p['bigopt_wall_s']:.1f} | {1e3 * p['plain_wall_s']:.1f} "
            f"| {p['wall_ratio']:.3f} | {lo:.2f}-{hi:.2f} | {100 * r['data_wait_frac']:.1f} % "
            f"| {r['load'][0]}-{r['load'][1]} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- part b
def part_b(args: argparse.Namespace, data_dir: str, storage: Path) -> dict[str, Any]:
    steps, log_every, warmup = (8, 2, 4) if args.quick else (12, 4, 4)
    model = B_QUICK_MODEL if args.quick else B_MODEL
    names = args.configs or (B_QUICK_RUNS if args.quick else list(B_RUNS))
    if "z0" not in names:
        names = ["z0", *names]  # the baseline every ratio is taken against
    common = B_COMMON + model + [f"train.max_steps={steps}", f"train.log_every={log_every}"]
    results: dict[str, Any] = {"model": model, "steps": steps, "warmup": warmup, "runs": {},
                               "malloc_mmap_threshold": args.malloc_mmap_threshold}
    if any("offload" in n for n in names):
        results["cpu_adam_build_s"] = build_cpu_adam()
    for name in names:
        r = run_bigopt(name, common + B_RUNS[name], data_dir, storage)
        results["runs"][name] = r
        if "error" in r:
            continue
        rows = r["rows"]
        windows = steady_windows(rows, warmup)
        per_step = rows[0]["samples_per_s"] * rows[0]["step_time_s"]  # samples per step
        r["samples_per_s"] = per_step / summarize(windows)["mean_s"]
        r["cpu_step_s"] = summarize(steady_windows(rows, warmup, cpu=True))["mean_s"]
        r["peak_rss_mb"] = max(row["peak_rss_mb"] for row in rows)
        probed = [row for row in rows if "ms_total_mb" in row] or rows[-1:]
        r["probe"] = {k: v for k, v in probed[0].items()
                      if k.startswith(("ms_", "psi_", "rss_"))}
    return results


def build_cpu_adam() -> float:
    """Build DeepSpeed's cpu_adam op (used by ZeRO offload) before timing anything.

    DeepSpeed compiles it on first use (minutes) and caches it under ~/.cache/torch_extensions;
    building it here keeps that out of the offload runs. A subprocess: no DeepSpeed import in
    this driver.
    """
    started = time.time()
    subprocess.run([sys.executable, "-c", "from deepspeed.ops.op_builder import CPUAdamBuilder; "
                    "CPUAdamBuilder().load()"], check=True, capture_output=True)
    seconds = time.time() - started
    print(f"cpu_adam op ready in {seconds:.0f} s", flush=True)
    return seconds


def table_b(res: dict[str, Any]) -> str:
    runs = res["runs"]
    ok = {n: r for n, r in runs.items() if "error" not in r}
    if "z0" not in ok:
        return "z0 (the baseline) failed: " + runs.get("z0", {}).get("error", "not run")
    base, nan = ok["z0"], float("nan")
    psi = base["probe"].get("psi_local", nan)
    base_delta = base["peak_rss_mb"] - base["probe"].get("rss_before_model_mb", nan)
    lines = [
        f"Psi = {psi / 1e6:.2f}M parameters, N = 2 data-parallel ranks (pipeline: 2 stages x "
        "1 rank); memory is rank 0's; ratios are against z0.", "",
        "| config | samples/s | x z0 | peak RSS MB | x z0 | RSS before model MB "
        "| peak - before MB | x z0 | CPU s/step | load 1m |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        if "error" in r:
            lines.append(f"| {name} | FAILED: {r['error']} |||||||||")
            continue
        before = r["probe"].get("rss_before_model_mb", nan)
        delta = r["peak_rss_mb"] - before
        lines.append(
            f"| {name} | {r['samples_per_s']:.2f} | "
            f"{r['samples_per_s'] / base['samples_per_s']:.2f} | {r['peak_rss_mb']:.0f} "
            f"| {r['peak_rss_mb'] / base['peak_rss_mb']:.2f} | {before:.0f} | {delta:.0f} "
            f"| {delta / base_delta:.2f} | {r['cpu_step_s']:.2f} | {r['load'][0]}-{r['load'][1]} |")
    lines += [
        "", "Model states at the optimizer step of step 2 (resident MB, rank 0; see train_probe.py):", "",
        "| config | local params | paper bytes/param | paper MB | x z0 | measured: params "
        "+ master + opt + .grad = states MB | x z0 | other tensors MB | allocated MB "
        "| RSS then MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    paper0 = paper_bytes_per_param("z0", 2) * psi / 2**20
    states0 = sum(base["probe"].get(f"ms_{k}_mb", nan)
                  for k in ("params", "master", "opt_state", "grads"))
    for name, r in ok.items():
        p = r["probe"]
        local = p.get("psi_local", nan)
        per_param = paper_bytes_per_param(name, 2) or nan
        paper_mb = per_param * local / 2**20
        parts = [p.get(f"ms_{k}_mb", nan) for k in ("params", "master", "opt_state", "grads")]
        states = sum(parts)
        lines.append(
            f"| {name} | {local / 1e6:.2f}M | {per_param:.1f} | {paper_mb:.0f} "
            f"| {paper_mb / paper0:.2f} | {' + '.join(f'{x:.0f}' for x in parts)} = "
            f"**{states:.0f}** | {states / states0:.2f} | {p.get('ms_other_mb', nan):.0f} "
            f"| {p.get('ms_allocated_mb', nan):.0f} | {p.get('rss_at_step2_mb', nan):.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and configs")
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--configs", type=lambda s: s.split(","), default=None,
                        help=f"part b configs, comma-separated, from: {', '.join(B_RUNS)}")
    parser.add_argument("--storage", default=str(REPO / "runs" / "benchmarks"))
    parser.add_argument("--verbose", action="store_true", help="stream worker logs")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="set MALLOC_MMAP_THRESHOLD_ in Ray workers: glibc then returns "
                        "freed large blocks to the OS, so RSS follows live memory")
    args = parser.parse_args()
    for name in args.configs or []:
        if name not in B_RUNS:
            parser.error(f"--configs: unknown {name!r}; choose from {', '.join(B_RUNS)}")
    os.chdir(REPO)  # the quickstart spec's relative storage and our paths
    storage = Path(args.storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)

    import ray
    import ray.cloudpickle
    import train_probe  # benchmarks/ is sys.path[0] when this file runs as a script

    # Ship the probe by value: Ray's workers do not have benchmarks/ on their path.
    ray.cloudpickle.register_pickle_by_value(train_probe)
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": train_probe.worker_setup}
    if args.malloc_mmap_threshold:
        runtime_env["env_vars"] = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)}
    # address="local": always a Ray of our own, never another engineer's `ray start` cluster.
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=args.verbose,
             runtime_env=runtime_env)
    started = time.time()
    out: dict[str, Any] = {"command": " ".join(["python", *sys.argv]),
                           "date": dt.datetime.now().isoformat(timespec="seconds"),
                           "machine": machine()}
    print(f"machine: {out['machine']}", flush=True)
    try:
        data_dir = prepare_data(storage)
        if args.part in ("a", "all"):
            out["a"] = part_a(args, data_dir, storage)
        if args.part in ("b", "all"):
            out["b"] = part_b(args, data_dir, storage)
    finally:
        ray.shutdown()
    out["wall_s"] = time.time() - started
    out["machine"]["uptime_end"] = subprocess.run(["uptime"], capture_output=True,
                                                  text=True).stdout.strip()
    path = storage / f"results-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"\n{out['command']}  ({out['date']}, {out['wall_s']:.0f} s)")
    print(f"{out['machine']['cpu']}, {out['machine']['cores']} cores; "
          f"start: {out['machine']['uptime']}; end: {out['machine']['uptime_end']}")
    if "a" in out:
        print(f"\n## a. bigopt 1 worker vs plain PyTorch (steady windows after "
              f"{out['a']['warmup']} warm-up steps, {out['a']['steps']} steps)\n")
        print(table_a(out["a"]))
    if "b" in out:
        malloc = out["b"]["malloc_mmap_threshold"]
        print(f"\n## b. 2 workers, bf16: ZeRO stages and pipeline ({out['b']['steps']} steps, "
              f"{' '.join(out['b']['model'])}"
              f"{f', MALLOC_MMAP_THRESHOLD_={malloc}' if malloc else ''})\n")
        print(table_b(out["b"]))
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
