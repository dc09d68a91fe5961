"""The plain PyTorch baseline of benchmarks/train.py part a: bigopt's GPT, no Ray, no DeepSpeed.

train.py starts ``python benchmarks/plain_loop.py CONFIG_JSON`` next to each bigopt run and
stops it afterwards; it writes one JSON line per step, which train.py pairs with bigopt's
log windows that ran in the same seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def load_batches(data_dir: str, batch_size: int, n: int) -> list[tuple[Any, Any]]:
    """The first ``n`` training batches of the prepared shards, held in memory."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    files = sorted((Path(data_dir) / "data" / "train").glob("*.parquet"))
    table = pq.read_table(files[0], columns=["input_ids", "labels"]).slice(0, n * batch_size)

    def column(name: str) -> Any:
        arr = table.column(name).combine_chunks()
        arr = getattr(arr, "storage", arr)  # Ray's tensor extension type wraps a list array
        return np.asarray(arr.flatten()).reshape(len(arr), -1).astype(np.int64)

    x, y = torch.from_numpy(column("input_ids")), torch.from_numpy(column("labels"))
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def plain_steps(mode: str, spec_path: str, overrides: list[str], data_dir: str,
                threads: int) -> Iterator[tuple[float, float, float]]:
    """A plain PyTorch loop, endless: (end time, wall s, CPU s) per step.

    The bigopt GPT and AdamW settings; no Ray, no DeepSpeed, batches held in memory.
    mode fp32: fp32 weights and compute. autocast: fp32 weights, forward under
    ``torch.autocast("cpu", bfloat16)`` (what bigopt's DDPEngine does). master: bf16 weights,
    activations and gradients; fp32 master weights and AdamW states, gradients copied up and
    weights copied down every step (what DeepSpeed's bf16 optimizer does).
    """
    import torch

    import bigopt
    from bigopt.models import GPT
    from bigopt.resolve import resolve
    from bigopt.train.engine import lr_lambda, param_groups
    from bigopt.train.loop import build_model

    torch.set_num_threads(threads)
    spec = bigopt.load_spec(spec_path, overrides=overrides)
    train = spec.train
    torch.manual_seed(train.seed)
    model = build_model(resolve(spec).model_copy(update={"deepspeed_config": None}))
    if mode == "master":
        model = model.to(torch.bfloat16)
        master = [p.detach().float().requires_grad_() for p in model.parameters()]
        index = {id(p): m for p, m in zip(model.parameters(), master, strict=True)}
        groups = [{**g, "params": [index[id(p)] for p in g["params"]]}
                  for g in param_groups(model, train.weight_decay)]
    else:
        master, groups = [], param_groups(model, train.weight_decay)
    opt = torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train.schedule, train.max_steps))
    batches = load_batches(data_dir, train.batch_size, 64)
    model.train()
    step = 0
    while True:
        start, cpu_start = time.perf_counter(), time.process_time()
        x, y = batches[step % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            logits = model(x)
        loss = GPT.loss(logits.float(), y)
        loss.backward()
        if mode == "master":
            for p, m in zip(model.parameters(), master, strict=True):
                m.grad, p.grad = p.grad.float(), None
        torch.nn.utils.clip_grad_norm_(master or model.parameters(), train.clip_grad)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if mode == "master":
            with torch.no_grad():
                for p, m in zip(model.parameters(), master, strict=True):
                    p.copy_(m)
        loss.item()
        step += 1
        yield time.time(), time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    """``python plain_loop.py CONFIG_JSON``: run plain_steps until ``cfg["stop"]`` exists.

    Writes one JSON line per step to ``cfg["out"]``: end time, wall and CPU seconds.
    """
    cfg = json.loads(sys.argv[1])
    os.nice(cfg["nice"] - os.nice(0))  # the Ray worker's priority (it is niced)
    with open(cfg["out"], "w") as out:
        for t, wall, cpu in plain_steps(cfg["mode"], cfg["spec"], cfg["overrides"],
                                        cfg["data_dir"], cfg["threads"]):
            out.write(json.dumps({"t": t, "wall": wall, "cpu": cpu}) + "\n")
            out.flush()
            if os.path.exists(cfg["stop"]) or time.time() - cfg["started"] > cfg["max_s"]:
                return


if __name__ == "__main__":
    main()
