"""GPU benchmark driver (run by benchmarks/gpu.sh): MFU, fp16 and bf16 through bigopt.

For each entry of ``--matrix`` (model:precision:zero[:probe]; zero ``ddp`` = bigopt's plain
PyTorch strategy): one ``bigopt.run`` with 1 worker, 1 GPU, on stdlib data prepared once at
the model's context. The numbers come from bigopt's own ``train/metrics.jsonl``
(``tokens_per_s``, ``flops_per_s``, ``mfu``) over the log windows after warm-up. Ratios: fp16
vs bf16 of the same model and strategy, measured in the same run. A ``probe`` run (fp16) logs
every step from a loss scale that overflows and is checked against DeepSpeed's dynamic
loss-scaling rule. BENCHMARKS.md section 2 has the H200 figures.

    python benchmarks/gpu.py                # the GPU matrix (what gpu.sh runs)
    python benchmarks/gpu.py --smoke        # CPU: gpt-1m, bf16, 5 steps (checks the logic)
    python benchmarks/gpu.py --dry-run      # validate the specs only, no Ray
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before `import ray`: loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "jobs" / "quickstart.yaml"


# model:precision:zero[:probe] per run. The probe is an fp16 run started at a loss scale high
# enough to overflow, with a short growth window, logged every step: its scale sequence is
# checked against DeepSpeed's dynamic loss-scaling rule (check_loss_scale).
DEFAULT_MATRIX = ("gpt2-124m:bf16:0,gpt2-124m:fp16:0,gpt2-124m:bf16:2,gpt2-124m:fp16:2:probe,"
                  "gpt2-350m:bf16:0")
PROBE = {"initial_scale_power": 24, "loss_scale_window": 10, "hysteresis": 2, "min_loss_scale": 1}


def plan(smoke: bool, matrix: str, steps: int,
         batch: int) -> list[tuple[str, str, str, bool, list[str]]]:
    """(model, precision, zero stage, probe, spec overrides) per run.

    Every preset field is also set explicitly: quickstart.yaml's own n_layer/d_model/context
    count as explicitly set, so ``model.preset`` alone would keep its 4 x 128 model (see
    BENCHMARKS.md, bigopt issues).
    """
    from bigopt.models import GPT_PRESETS

    common = ["cluster.num_workers=1",
              f"train.max_steps={steps}", f"train.batch_size={batch}", "train.eval_every=0",
              "train.eval_batches=1", "train.checkpoint_every=0", "train.schedule.warmup_steps=2"]
    common += (["cluster.gpus_per_worker=0", "cluster.cpus_per_worker=1"] if smoke else
               ["cluster.gpus_per_worker=1", "cluster.cpus_per_worker=4"])
    runs = []
    for item in matrix.split(","):
        model, precision, zero, *flags = item.split(":")
        probe = "probe" in flags
        overrides = [f"model.preset={model}"] + [f"model.{k}={v}"
                                                 for k, v in GPT_PRESETS[model].items()]
        # zero "ddp": bigopt's plain-PyTorch strategy (fp32 weights, autocast, fused AdamW)
        strategy = (["train.strategy=ddp"] if zero == "ddp" else
                    ["train.strategy=deepspeed", f"train.zero.stage={zero}"])
        overrides += common + strategy + [f"train.precision={precision}",
                                          f"train.log_every={1 if smoke or probe else 10}"]
        if probe:
            overrides += [f"train.fp16.{k}={v}" for k, v in PROBE.items()]
        runs.append((model, precision, zero, probe, overrides))
    return runs


def check_loss_scale(rows: list[dict[str, Any]], initial_scale_power: int, loss_scale_window: int,
                     hysteresis: int, min_loss_scale: float) -> dict[str, Any]:
    """Replay DeepSpeed's dynamic loss scaler (``DynamicLossScaler.update_scale``) on the
    overflows the run reported (a step whose ``skipped_steps`` grew) and compare its scale
    after every step with the logged ``loss_scale``. Needs a row per step (log_every=1)."""
    rows = sorted(rows, key=lambda r: r["step"])
    scale, hyst, last_overflow, prev_skipped = 2.0 ** initial_scale_power, hysteresis, -1, 0
    mismatches, overflows, halvings, growths = [], 0, 0, 0
    for i, row in enumerate(rows):
        if row["step"] != i + 1 or row.get("loss_scale") is None:
            return {"ok": False, "why": f"row {i}: need a row with loss_scale for every step"}
        overflow = row["skipped_steps"] > prev_skipped
        prev_skipped = row["skipped_steps"]
        if overflow:
            overflows += 1
            if hyst == 1:
                new = max(scale / 2, min_loss_scale)
                halvings += new < scale
                scale = new
            else:
                hyst -= 1
            last_overflow = i
        elif (i - last_overflow - 1) > 0 and (i - last_overflow - 1) % loss_scale_window == 0:
            hyst, scale, growths = hysteresis, scale * 2, growths + 1  # a window of clean steps
        if row["loss_scale"] != scale:
            mismatches.append({"step": row["step"], "logged": row["loss_scale"], "expected": scale})
    return {"ok": not mismatches and overflows > 0 and growths > 0, "overflows": overflows,
            "halvings": halvings, "growths": growths, "first_scale": rows[0]["loss_scale"],
            "last_scale": rows[-1]["loss_scale"], "mismatches": mismatches[:5],
            "scales": [r["loss_scale"] for r in rows]}


def steady(rows: list[dict[str, Any]], warmup: int) -> dict[str, float | None]:
    """Time-weighted means over log windows that start after ``warmup`` steps."""
    windows, prev = [], 0
    for r in sorted(rows, key=lambda r: r["step"]):
        if prev >= warmup:
            windows.append((r["step"] - prev, r))
        prev = r["step"]
    if not windows:
        raise ValueError(f"no log window after {warmup} warm-up steps: raise the step count")
    seconds = sum(n * r["step_time_s"] for n, r in windows)
    out: dict[str, float | None] = {"step_s": seconds / sum(n for n, _ in windows)}
    for key in ("tokens_per_s", "flops_per_s", "mfu"):
        have = [(n, r) for n, r in windows if r.get(key) is not None]
        # rate x time = work; total work / total time is the window-weighted rate
        out[key] = (sum(n * r["step_time_s"] * r[key] for n, r in have) / seconds
                    if len(have) == len(windows) else None)
    last = rows[-1]
    out["skipped_steps"] = last.get("skipped_steps")
    out["loss_scale"] = last.get("loss_scale")
    out["gpu_peak_mb"] = last.get("gpu_peak_mb")
    return out


def _pin_ray_address() -> None:
    """Ray worker setup hook: keep Ray Train's State API lookups on this cluster.

    Without it, on a host running other Ray instances, Ray Train's PlacementGroupCleaner can
    query another cluster, find no controller there and remove this run's placement group.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available()
                            else None}
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = q.stdout.strip()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                        if ln.startswith("Model name")), "?")
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, gpt-1m, bf16, 5 steps")
    p.add_argument("--dry-run", action="store_true", help="validate the specs, start nothing")
    p.add_argument("--matrix", default=DEFAULT_MATRIX,
                   help="runs as model:precision:zero[:probe], comma-separated")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the averages")
    p.add_argument("--batch", type=int, default=16, help="micro-batch (sequences per step)")
    p.add_argument("--storage", default=str(REPO / "runs" / "benchmarks-gpu"))
    args = p.parse_args()
    if args.smoke:
        args.matrix, args.steps, args.warmup, args.batch = "gpt-1m:bf16:0", 5, 2, 4
    os.chdir(REPO)

    import bigopt

    runs = plan(args.smoke, args.matrix, args.steps, args.batch)
    specs = [(m, prec, zero, probe, bigopt.load_spec(QUICKSTART, overrides=o))
             for m, prec, zero, probe, o in runs]
    for m, prec, zero, probe, spec in specs:
        print(f"{m} {prec} zero-{zero}{' probe' if probe else ''}: "
              f"{spec.model.model_dump(exclude={'kind'})} "
              f"batch {spec.train.batch_size} x {spec.context} tokens, {spec.train.max_steps} steps")
    if args.dry_run:
        return

    import ray

    storage = Path(args.storage).resolve()
    info = device_info()
    print(f"device: {info}", flush=True)
    if not args.smoke and not info["gpu"]:
        sys.exit("no CUDA GPU visible to torch: install a CUDA build of torch, or use --smoke")
    started = time.time()
    ray.init(address="local", include_dashboard=False, log_to_driver=True,
             runtime_env={"worker_process_setup_hook": _pin_ray_address},
             **({"num_cpus": 3} if args.smoke else {}))
    results: list[dict[str, Any]] = []
    try:
        data: dict[int, Path] = {}  # context -> prepared run dir, shared by the runs
        for model, precision, zero, probe, spec in specs:
            ctx = spec.context
            if ctx not in data:
                data[ctx] = storage / f"data-ctx{ctx}"
                if not (data[ctx] / "data" / "manifest.json").exists():
                    bigopt.run(spec, stages=["data"], run_dir=str(data[ctx]))
            from bigopt.runtime import RunDir

            name = f"{model}-{precision}-z{zero}{'-probe' if probe else ''}"
            run = RunDir.create(str(storage), name)
            shutil.copytree(data[ctx] / "data", Path(run.path) / "data")
            t0 = time.time()
            try:
                bigopt.run(spec, stages=["train"], run_dir=run.uri)
            except Exception as e:  # one failed configuration must not hide the others
                print(f"[{name}] FAILED: {type(e).__name__}: {e}", flush=True)
                results.append({"model": model, "precision": precision, "zero": zero,
                                "probe": probe, "error": f"{type(e).__name__}: {e}"[:2000]})
                continue
            rows = run.read_jsonl("train/metrics.jsonl")
            shutil.rmtree(Path(run.path) / "train" / "checkpoints", ignore_errors=True)
            result = {"model": model, "precision": precision, "zero": zero, "probe": probe,
                      "run_dir": run.uri, "wall_s": time.time() - t0,
                      "loss_first": rows[0].get("loss"), "loss_last": rows[-1].get("loss"),
                      **steady(rows, args.warmup)}
            if probe:
                # ZeRO-0's fp16 optimizer (DeepSpeed's FP16_UnfusedOptimizer) halves on every
                # overflow: it has no hysteresis. ZeRO 1-3 use DynamicLossScaler, which has.
                rule = {**PROBE, "hysteresis": PROBE["hysteresis"] if zero != "0" else 1}
                result["loss_scale_check"] = check_loss_scale(rows, **rule)
            results.append(result)
            print(f"[{model} {precision}] {results[-1]}", flush=True)
    finally:
        ray.shutdown()
    report(results, info, args, time.time() - started, storage)


def fmt(v: float | None, scale: float = 1.0, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v * scale, spec)


def report(results: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace,
           wall: float, storage: Path) -> None:
    lines = [f"{' '.join(sys.argv)}  ({dt.datetime.now():%Y-%m-%d %H:%M}, {wall:.0f} s)",
             f"device: {info}", "",
             "| model | precision | ZeRO | step ms | tokens/s | TFLOP/s | MFU | x bf16 (tokens/s) "
             "| loss first -> last | loss scale (last) | skipped steps | GPU peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bf16 = {(r["model"], r["zero"]): r.get("tokens_per_s") for r in results
            if r["precision"] == "bf16"}
    for r in results:
        head = f"| {r['model']} | {r['precision']}{' (probe)' if r['probe'] else ''} | {r['zero']} "
        if "error" in r:
            lines.append(head + f"| FAILED: {r['error'][:200]} |")
            continue
        base = bf16.get((r["model"], r["zero"]))
        ratio = r["tokens_per_s"] / base if base and r["tokens_per_s"] else None
        lines.append(
            head + f"| {fmt(r['step_s'], 1e3)} "
            f"| {fmt(r['tokens_per_s'], 1, '.0f')} | {fmt(r['flops_per_s'], 1e-12, '.2f')} "
            f"| {fmt(r['mfu'], 100)} {'%' if r['mfu'] is not None else ''} "
            f"| {fmt(ratio, 1, '.2f')} | {fmt(r['loss_first'], 1, '.2f')} -> "
            f"{fmt(r['loss_last'], 1, '.2f')} | {fmt(r['loss_scale'], 1, '.0f')} "
            f"| {r['skipped_steps'] if r['skipped_steps'] is not None else '-'} "
            f"| {fmt(r['gpu_peak_mb'], 1, '.0f')} |")
    for r in results:
        if "loss_scale_check" in r:
            c = r["loss_scale_check"]
            lines.append(f"\nloss-scale check ({r['model']} fp16 ZeRO-{r['zero']}, {PROBE}): "
                         f"{'OK' if c['ok'] else 'FAILED'}; " + ", ".join(
                             f"{k} {v}" for k, v in c.items() if k not in ("ok", "scales")))
    text = "\n".join(lines)
    print("\n" + text)
    stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}"
    out = {"command": " ".join(sys.argv), "device": info, "wall_s": wall, "results": results}
    storage.mkdir(parents=True, exist_ok=True)
    (storage / f"gpu-results-{stamp}.json").write_text(json.dumps(out, indent=1))
    (storage / f"gpu-results-{stamp}.md").write_text(text + "\n")
    if os.environ.get("OUT"):  # a lent device machine's return folder
        Path(os.environ["OUT"], "gpu-results.md").write_text(text + "\n")
        Path(os.environ["OUT"], "gpu-results.json").write_text(json.dumps(out, indent=1))
    print(f"results: {storage}/gpu-results-{stamp}.{{json,md}}")


if __name__ == "__main__":
    main()
