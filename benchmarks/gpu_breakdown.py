"""Where a bigopt GPU step's time goes: one process, no Ray Train, phases timed with CUDA events.

benchmarks/gpu.py measures bigopt end to end (Ray Train + DeepSpeed) against a plain PyTorch
loop; this script splits the gap. Each variant trains the same GPT on the same batches for
``--warmup`` + ``--steps`` steps and reports, per step, the wall time, the GPU time of forward
(+ loss), backward and optimizer step (CUDA events, read after the loop), and the host time
spent issuing each phase (perf_counter, no synchronisation inside the step):

* ``plain``: fp32 weights, bf16 autocast, ``torch.optim.AdamW(fused=True)``, grad clipping;
* ``ds-z0`` / ``ds-z2``: bigopt's own DeepSpeed config (``resolve(spec).deepspeed_config``,
  bf16) and engine builder (``build_deepspeed_engine``), random batches already on the GPU;
* ``ds-z2-fused``: the same with ``"fused": true`` in the optimizer params (torch's fused AdamW);
* ``ds-z2-raydata``: ``ds-z2`` fed by bigopt's ingest (``epoch_batches`` over a Ray Data
  dataset, ``iter_torch_batches`` with its prefetch threads, as a worker is);
* ``ds-z2-compile``: ``ds-z2`` with ``engine.compile()`` (torch.compile of the module).

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29555 RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 \\
        python benchmarks/gpu_breakdown.py --out breakdown.json
    python benchmarks/gpu_breakdown.py --cpu-smoke      # the logic on CPU: gpt-1m, 3 steps
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

VARIANTS = "plain,ds-z0,ds-z2,ds-z2-fused,ds-z2-raydata,ds-z2-compile"


def spec_for(model: str, zero: int, steps: int, batch: int, smoke: bool) -> Any:
    from gpu import QUICKSTART, plan

    import bigopt

    ((*_, overrides),) = plan(smoke, f"{model}:bf16:{zero}", steps, batch)
    return bigopt.load_spec(QUICKSTART, overrides=overrides)


class Phases:
    """CUDA events around forward, backward and step; host seconds spent issuing each."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks, self.host = cuda, [], []

    def step(self, fwd, bwd, opt) -> float:  # noqa: ANN001
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if self.cuda else None
        t = [time.perf_counter()]
        ev and ev[0].record()
        loss = fwd()
        ev and ev[1].record()
        t.append(time.perf_counter())
        bwd(loss)
        ev and ev[2].record()
        t.append(time.perf_counter())
        opt()
        ev and ev[3].record()
        t.append(time.perf_counter())
        self.marks.append(ev)
        self.host.append([b - a for a, b in zip(t, t[1:], strict=False)])
        return loss

    def summary(self, skip: int) -> dict[str, float]:
        host = self.host[skip:]
        out = {f"host_{k}_ms": 1e3 * sum(h[i] for h in host) / len(host)
               for i, k in enumerate(("fwd", "bwd", "step"))}
        if self.cuda:
            torch.cuda.synchronize()
            marks = self.marks[skip:]
            for i, k in enumerate(("fwd", "bwd", "step")):
                out[f"gpu_{k}_ms"] = sum(m[i].elapsed_time(m[i + 1]) for m in marks) / len(marks)
            # gaps: GPU idle between the end of one step and the start of the next
            gaps = [a[3].elapsed_time(b[0]) for a, b in zip(marks, marks[1:], strict=False)]
            out["gpu_gap_ms"] = sum(gaps) / max(len(gaps), 1)
        return out


def random_batches(n: int, batch: int, ctx: int, dev: torch.device) -> list[tuple[Any, Any]]:
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        seq = torch.randint(0, 256, (batch, ctx + 1), generator=gen)
        out.append((seq[:, :-1].contiguous().to(dev), seq[:, 1:].contiguous().to(dev)))
    return out


def ray_batches(batch: int, ctx: int, dev: torch.device) -> Any:
    """bigopt's ingest over a Ray Data dataset of token windows (as the train split is)."""
    import numpy as np
    import ray

    from bigopt.data.ingest import epoch_batches

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, num_cpus=4, log_to_driver=False)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (batch * 64, ctx + 1), dtype=np.int32)
    ds = ray.data.from_items([{"input_ids": r[:-1], "labels": r[1:]} for r in rows])
    return epoch_batches(ds.materialize(), batch_size=batch, seed=0, shuffle_buffer=0, device=dev)


def run_variant(name: str, args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    from bigopt.models import from_arch
    from bigopt.resolve import resolve
    from bigopt.tasks import get_task
    from bigopt.train.engine import build_deepspeed_engine, param_groups
    from bigopt.train.loop import seed_everything

    zero = 2 if "z2" in name else 0
    spec = spec_for(args.model, zero, args.warmup + args.steps, args.batch, args.cpu_smoke)
    job = resolve(spec)
    train, ctx = spec.train, spec.context
    seed_everything(train.seed)
    model = from_arch(job.arch)
    loss_fn = get_task(job.task).loss
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    row: dict[str, Any] = {"variant": name, "model": args.model, "batch": args.batch,
                           "context": ctx}
    t_init = time.time()
    if name == "plain":
        net = model.to(dev)
        opt = torch.optim.AdamW(param_groups(net, train.weight_decay), lr=train.lr,
                                betas=tuple(train.betas), eps=1e-8, **({"fused": True} if cuda else {}))

        def fwd() -> torch.Tensor:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = net(x)
            return loss_fn(out, y)

        def bwd(loss: torch.Tensor) -> None:
            loss.backward()

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), train.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        ds_config = json.loads(json.dumps(job.deepspeed_config))
        if "fused" in name and cuda:
            ds_config["optimizer"]["params"]["fused"] = True
        engine = build_deepspeed_engine(model, loss_fn, ds_config, train, pp_stages=1,
                                        partition=train.pipeline.partition)
        if "compile" in name:
            engine.compile()
        row["optimizer"] = type(engine.optimizer).__name__
        engine.train()

        def fwd() -> torch.Tensor:
            return loss_fn(engine(x), y)

        def bwd(loss: torch.Tensor) -> None:
            engine.backward(loss)

        def step() -> None:
            engine.step()
    row["init_s"] = time.time() - t_init
    if "raydata" in name:
        batches = ray_batches(args.batch, ctx, dev)
    else:
        pool = random_batches(8, args.batch, ctx, dev)
        batches = (pool[i % len(pool)] for i in range(10**9))
    phases = Phases(cuda)
    losses, t_first = [], time.time()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            cuda and torch.cuda.synchronize()
            t0 = time.perf_counter()
        x, y = next(batches)
        loss = phases.step(fwd, bwd, step)
        losses.append(loss.item())  # every loop here (bigopt, plain) reads the loss per step
        if i == 0:
            row["first_step_s"] = time.time() - t_first
    cuda and torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    tokens_per_s = args.batch * ctx / wall
    row.update(step_ms=1e3 * wall, tokens_per_s=tokens_per_s,
               flops_per_s=tokens_per_s * float(model.flops_per_sample()) / ctx,
               loss_first=losses[0], loss_last=losses[-1], **phases.summary(args.warmup),
               gpu_peak_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
    del batches
    gc.collect()
    cuda and torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-124m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--variants", default=VARIANTS)
    p.add_argument("--budget-s", type=float, default=1e9, help="start no variant after this")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--out", default=None, help="JSON lines, appended")
    args = p.parse_args()
    if args.cpu_smoke:
        args.model, args.batch, args.warmup, args.steps = "gpt-1m", 2, 1, 2
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    started = time.time()
    for name in args.variants.split(","):
        if time.time() - started > args.budget_s:
            row = {"variant": name, "skipped": "time budget"}
        else:
            try:
                row = run_variant(name, args, dev)
            except Exception as exc:  # noqa: BLE001 - one variant's failure is a result too
                row = {"variant": name, "error": f"{type(exc).__name__}: {exc}"[:1500]}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
