"""DeepSpeed without Ray: bigopt's model, DeepSpeed config and engine in one process.

Isolates DeepSpeed's cost from Ray's. For each config (ZeRO stage x precision) the spec is
the one benchmarks/gpu.py's plan() makes (jobs/quickstart.yaml + model.preset + every preset
field + 1 worker, 1 GPU, deepspeed), with train.zero.stage replaced. Then, as bigopt's
Trainer does: seed_everything(train.seed), build_model_from_spec, loss_in_fp32,
check_precision_supported, build_deepspeed_config(spec, Layout(1, 1, stage), precision),
build_deepspeed_engine (deepspeed.initialize with bigopt's param groups and LR schedule), and
per step: engine(x) -> loss -> engine.backward -> engine.step -> loss.item() -> the loss
all-reduce. Data: random byte tokens (vocab 256) at the model context, pre-made on the device.

Reports per config: tokens/s and TFLOP/s over the steps after --warmup (as gpu.py's steady()
does with bigopt's metrics), MFU against bigopt's peak table (989 TFLOP/s on H100/H200),
loss first/last, fp16 loss scale and skipped steps, peak GPU memory.

    python3 ds_direct.py --out ds_direct.json               # GPU: z0/z2 x bf16/fp16, 60 steps
    python3 ds_direct.py --cpu-smoke                        # CPU: gpt-1m, bf16, 3 steps
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# run.sh sets BIGOPT_DIR; else .gpu/bigopt (a copy) or the checkout that holds .gpu/
PROJECT = Path(os.environ.get("BIGOPT_DIR") or
               (HERE / "bigopt" if (HERE / "bigopt").is_dir() else HERE.parent)).resolve()
for p in (str(PROJECT), str(PROJECT / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

OUT_PATH: Path | None = None
DATASHEET_PEAK = 989e12


def emit(obj: dict[str, Any]) -> None:
    print("JSON " + json.dumps(obj), flush=True)
    if OUT_PATH is not None:
        with OUT_PATH.open("a") as f:
            f.write(json.dumps(obj) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    global OUT_PATH
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU, gpt-1m, bf16, 3 steps")
    ap.add_argument("--model", default="gpt2-124m")
    ap.add_argument("--configs", default="z0-bf16,z0-fp16,z2-bf16,z2-fp16")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of the averages")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="skip a config that would not finish inside this many seconds")
    ap.add_argument("--out", default=None, help="JSON lines file (appended)")
    args = ap.parse_args()
    started = time.time()
    if args.cpu_smoke:
        args.model, args.steps, args.warmup, args.batch = "gpt-1m", 3, 1, 2
        args.configs = ",".join(c for c in args.configs.split(",") if c.endswith("bf16"))
    if args.out:
        OUT_PATH = Path(args.out)
        OUT_PATH.parent.mkdir(parents=True, exist_ok=True)

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)

    import torch

    t_imp = time.time()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    import bigopt
    from bigopt.train.engine import build_deepspeed_engine
    from bigopt.models import from_arch
    from bigopt.resolve import resolve
    from bigopt.tasks import get_task
    from bigopt.train.loop import seed_everything
    from bigopt.train.metrics import peak_flops
    from bigopt.train.parallel import Layout, build_deepspeed_config, check_precision_supported
    from gpu import QUICKSTART, plan  # benchmarks/gpu.py: the exact spec overrides it runs

    import_s = time.time() - t_imp
    use_cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not use_cuda and not args.cpu_smoke:
        sys.exit("no CUDA device visible to torch (use --cpu-smoke for a logic check)")
    accel = get_accelerator()
    if use_cuda:
        torch.cuda.set_device(0)
    device = torch.device(accel.current_device_name()) if use_cuda else torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    t0 = time.time()
    deepspeed.init_distributed(dist_backend=backend)
    init_dist_s = time.time() - t0
    dev_name = torch.cuda.get_device_name() if use_cuda else None
    peak = peak_flops(dev_name)
    emit({"kind": "meta", "torch": torch.__version__, "deepspeed": deepspeed.__version__,
          "accelerator": accel.device_name(), "device": str(device), "device_name": dev_name,
          "bigopt_peak_flops": peak, "backend": backend, "import_deepspeed_bigopt_s": import_s,
          "init_distributed_s": init_dist_s, "project": str(PROJECT)})

    per_config_s: list[float] = []
    for cfg in [c for c in args.configs.split(",") if c]:
        stage_s, precision = cfg.split("-")
        stage = int(stage_s.lstrip("z"))
        elapsed = time.time() - started
        guess = max(per_config_s) if per_config_s else 0.0
        if elapsed + guess > args.budget_s:
            emit({"kind": "train", "config": cfg, "skipped": f"time budget ({elapsed:.0f} s used, "
                  f"~{guess:.0f} s per config, budget {args.budget_s:.0f} s)"})
            continue
        c0 = time.time()
        row: dict[str, Any] = {"kind": "train", "config": cfg, "zero_stage": stage,
                               "precision": precision}
        engine = model = batches = None
        try:
            ((*_, overrides),) = plan(args.cpu_smoke, f"{args.model}:{precision}:0", args.steps,
                                      args.batch)
            overrides = [o for o in overrides if not o.startswith("train.zero.stage=")]
            overrides.append(f"train.zero.stage={stage}")
            spec = bigopt.load_spec(QUICKSTART, overrides=overrides)
            train = spec.train
            layout = Layout(1, train.pipeline.stages, train.zero.stage)
            if use_cuda:
                torch.cuda.reset_peak_memory_stats()
                row["gpu_mem_at_start_mb"] = torch.cuda.memory_allocated() / 2**20
            seed_everything(train.seed)
            job = resolve(spec)
            model = from_arch(job.arch)
            loss_fn = get_task(job.task).loss
            flops_per_sample = float(model.flops_per_sample())
            ctx = spec.context
            check_precision_supported(precision, fp16_supported=accel.is_fp16_supported(),
                                      device=accel.device_name())
            ds_config = build_deepspeed_config(spec, layout, precision)
            t_init = time.time()
            engine = build_deepspeed_engine(model, loss_fn, ds_config, train, pp_stages=1,
                                            partition=train.pipeline.partition)
            row.update(ds_initialize_s=time.time() - t_init, ds_config=ds_config,
                       optimizer=type(engine.optimizer).__name__,
                       basic_optimizer=type(getattr(engine, "basic_optimizer", None)).__name__)
            torch.manual_seed(train.seed + 1)
            gen = torch.Generator().manual_seed(4321)
            batches = []
            for _ in range(8):
                seq = torch.randint(0, 256, (train.batch_size, ctx + 1), generator=gen)
                batches.append((seq[:, :-1].contiguous().to(device),
                                seq[:, 1:].contiguous().to(device)))
            losses, step_times = [], []
            engine.train()
            for step in range(1, train.max_steps + 1):
                start = time.perf_counter()
                engine.train()
                x, y = batches[step % len(batches)]
                loss = loss_fn(engine(x), y)
                engine.backward(loss)
                engine.step()
                value = loss.item()
                t = torch.tensor([value], dtype=torch.float64)
                if backend == "nccl":
                    t = t.to(device)
                torch.distributed.all_reduce(t)  # bigopt's all_reduce_mean of the logged loss
                losses.append(float(t.item()))
                step_times.append(time.perf_counter() - start)
            steady = step_times[args.warmup:] or step_times
            step_s = sum(steady) / len(steady)
            samples_per_s = train.batch_size / step_s
            opt = engine.optimizer
            scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
            row.update(model=args.model, batch=train.batch_size, context=ctx,
                       steps=train.max_steps, warmup=args.warmup, step_s=step_s,
                       step_ms_min=1e3 * min(steady), step_ms_max=1e3 * max(steady),
                       first_step_s=step_times[0], tokens_per_s=samples_per_s * ctx,
                       flops_per_sample=flops_per_sample,
                       flops_per_s=samples_per_s * flops_per_sample,
                       mfu=(samples_per_s * flops_per_sample / peak) if peak else None,
                       mfu_vs_989=samples_per_s * flops_per_sample / DATASHEET_PEAK,
                       loss_first=losses[0], loss_last=losses[-1],
                       loss_scale=float(scale) if (precision == "fp16" and scale is not None) else None,
                       skipped_steps=int(getattr(engine, "skipped_steps", 0)) if precision == "fp16" else None,
                       gpu_peak_mb=torch.cuda.max_memory_allocated() / 2**20 if use_cuda else None)
        except Exception as exc:
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {exc}"[:800]
        row["config_wall_s"] = time.time() - c0
        per_config_s.append(row["config_wall_s"])
        emit(row)
        if "error" not in row:
            print(f"[{cfg}] {row['tokens_per_s']:.0f} tokens/s, step {1e3 * row['step_s']:.1f} ms, "
                  f"{row['flops_per_s'] / 1e12:.1f} TFLOP/s, MFU "
                  f"{'n/a' if row['mfu'] is None else format(100 * row['mfu'], '.1f') + ' %'}; "
                  f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}; "
                  f"loss scale {row['loss_scale']}, skipped {row['skipped_steps']}; "
                  f"GPU peak {row['gpu_peak_mb']} MB; {row['config_wall_s']:.1f} s", flush=True)
        del engine, model, batches
        gc.collect()
        if use_cuda:
            torch.cuda.empty_cache()
    print(f"ds_direct.py done in {time.time() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
