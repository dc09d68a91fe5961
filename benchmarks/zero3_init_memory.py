"""ZeRO-3 per-rank memory: model built plainly vs inside deepspeed.zero.Init (model_init_context).

2 ranks (one process each, gloo on 127.0.0.1, 1 thread each), the ~38M-parameter GPT of
benchmarks/train.py part b (12 layers, d_model 512, 8 heads, context 128, vocab 256), a ZeRO-3
bf16 DeepSpeed engine (``deepspeed.initialize``, torch AdamW, the config bigopt builds for
ZeRO-3 bf16) and one training step on random tokens (4 x 128 per rank). Two modes:

* ``before``: ``model = GPT(...)`` plainly, then ``deepspeed.initialize`` (which partitions it);
  every rank first holds the whole fp32 model;
* ``after``: the model is built inside ``bigopt.train.engine.model_init_context(ds_config)``,
  i.e. ``deepspeed.zero.Init``: parameters are partitioned (and bf16) as each layer is built.

Per rank it records the RSS (``/proc/self/statm``) and the peak RSS (``ru_maxrss``) before the
build, right after it, after ``deepspeed.initialize`` and after the step, plus the model bytes
the rank holds after the build and the step-1 loss (the same weights and data in both modes,
so the losses should agree). Each mode runs in fresh processes, so ``ru_maxrss`` is its own.
It prints a table and the after/before ratios, and writes the raw numbers as JSON.

    python benchmarks/zero3_init_memory.py                 # before and after, ~1 min on 2 cores
    python benchmarks/zero3_init_memory.py --repeats 2     # before, after, before, after
    python benchmarks/zero3_init_memory.py --malloc-mmap-threshold 131072  # RSS follows live memory

DeepSpeed's CPU backend would JIT-compile its shared-memory all-reduce op (deepspeed_shm_comm,
~60 s the first time) in ``init_distributed``; gloo is enough here, so the ranks mark that op
unavailable, in both modes alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = dict(vocab_size=256, context=128, n_layer=12, n_head=8, d_model=512)
BATCH = 4  # per rank, as benchmarks/train.py part b
WORLD = 2
MODES = ("before", "after")
MB = 2**20


def ds_config() -> dict[str, Any]:
    """bigopt's own DeepSpeed config for this model (``build_deepspeed_config``, the builder
    the trainer calls): ZeRO-3, bf16, AdamW, 2 ranks."""
    sys.path.insert(0, str(REPO))
    from bigopt.spec import parse_spec
    from bigopt.train.parallel import Layout, build_deepspeed_config

    spec = parse_spec({"name": "zero3-init", "cluster": {"num_workers": WORLD},
                       "model": {"kind": "gpt", **MODEL},
                       "train": {"strategy": "deepspeed", "zero": {"stage": 3}, "precision": "bf16",
                                 "batch_size": BATCH, "lr": 3e-4}})
    return build_deepspeed_config(spec, Layout(WORLD, 1, 3), "bf16")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- one rank
def rank_main(mode: str, out: str) -> None:
    import deepspeed
    import deepspeed.ops
    import torch

    from bigopt.models import GPT
    from bigopt.train.engine import model_init_context

    torch.set_num_threads(1)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see the module docstring
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    config = ds_config()
    row: dict[str, Any] = {"mode": mode, "rank": rank}

    def mark(name: str) -> None:
        torch.distributed.barrier()
        row[f"rss_{name}"], row[f"peak_{name}"] = rss_mb(), peak_mb()

    mark("start")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ctx = model_init_context(config) if mode == "after" else model_init_context(None)
    with ctx:
        model = GPT(**MODEL)
    row["build_s"] = time.perf_counter() - t0
    params = list(model.parameters())
    row["num_params"] = model.num_params()
    row["held_model_mb"] = sum(
        (p.ds_tensor if hasattr(p, "ds_id") else p).numel() * p.element_size() for p in params) / MB
    row["param_dtype"] = str(params[0].dtype)
    mark("built")

    t0 = time.perf_counter()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    row["initialize_s"] = time.perf_counter() - t0
    mark("initialized")

    gen = torch.Generator().manual_seed(1000 + rank)
    seq = torch.randint(0, MODEL["vocab_size"], (BATCH, MODEL["context"] + 1), generator=gen)
    t0 = time.perf_counter()
    loss = GPT.loss(engine(seq[:, :-1]).float(), seq[:, 1:])
    engine.backward(loss)
    engine.step()
    row["step_s"] = time.perf_counter() - t0
    row["loss"] = loss.item()
    mark("step")

    with open(os.path.join(out, f"{mode}-rank{rank}.json"), "w") as f:
        json.dump(row, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- driver
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run_mode(mode: str, out: Path, mmap_threshold: int | None) -> list[dict[str, Any]]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(WORLD), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    procs = [subprocess.Popen([sys.executable, __file__, "--rank-of", mode, "--out", str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = [p.communicate()[0] for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        if p.returncode != 0:
            raise SystemExit(f"{mode} rank {r} failed (exit {p.returncode}):\n{log[-4000:]}")
    rows = []
    for r in range(WORLD):
        path = out / f"{mode}-rank{r}.json"
        rows.append(json.loads(path.read_text()))
        path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode, interleaved")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None,
                        help="MALLOC_MMAP_THRESHOLD_ for the ranks (glibc returns freed blocks)")
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks"))
    parser.add_argument("--rank-of", choices=MODES, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.rank_of:
        rank_main(args.rank_of, args.out)
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    print(f"start {started:%Y-%m-%d %H:%M} UTC, load average {load_average()}", flush=True)
    rows: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for mode in MODES:
            t0 = time.perf_counter()
            for row in run_mode(mode, out, args.malloc_mmap_threshold):
                rows.append({**row, "repeat": repeat, "wall_s": time.perf_counter() - t0,
                             "load_after": load_average()})
            print(f"  {mode} (repeat {repeat}) done, load average {load_average()}", flush=True)

    cols = [("rss_start", "RSS start"), ("rss_built", "RSS after build"),
            ("peak_built", "peak after build"), ("rss_initialized", "RSS after initialize"),
            ("peak_initialized", "peak after initialize"), ("rss_step", "RSS after step"),
            ("peak_step", "peak after step")]
    print(f"\nGPT {rows[0]['num_params'] / 1e6:.2f}M params, {WORLD} ranks, ZeRO-3 bf16, MB = MiB")
    print("| mode | repeat | rank | model held after build MB | build s | "
          + " | ".join(f"{title} MB" for _, title in cols) + " | build growth MB | step-1 loss |")
    print("|" + "---|" * (len(cols) + 7))
    for r in rows:
        print(f"| {r['mode']} | {r['repeat']} | {r['rank']} | {r['held_model_mb']:.1f} "
              f"({r['param_dtype'].replace('torch.', '')}) | {r['build_s']:.2f} | "
              + " | ".join(f"{r[key]:.0f}" for key, _ in cols)
              + f" | {r['rss_built'] - r['rss_start']:.0f} | {r['loss']:.6f} |")

    def mean(mode: str, f) -> float:
        values = [f(r) for r in rows if r["mode"] == mode]
        return sum(values) / len(values)

    print("\nafter / before (mean over ranks and repeats):")
    ratios = {
        "model bytes held after build": lambda r: r["held_model_mb"],
        "RSS growth during build": lambda r: r["rss_built"] - r["rss_start"],
        "peak RSS by end of build": lambda r: r["peak_built"],
        "peak RSS by end of initialize": lambda r: r["peak_initialized"],
        "peak RSS by end of step (= whole run)": lambda r: r["peak_step"],
        "peak RSS growth over RSS at start": lambda r: r["peak_step"] - r["rss_start"],
        "RSS after step": lambda r: r["rss_step"],
    }
    summary = {}
    for name, f in ratios.items():
        before, after = mean("before", f), mean("after", f)
        summary[name] = {"before": before, "after": after, "ratio": after / before}
        print(f"  {name}: {before:.0f} -> {after:.0f} MB, x{after / before:.2f}")
    losses = {m: sorted({round(r["loss"], 7) for r in rows if r["mode"] == m}) for m in MODES}
    print(f"  step-1 losses (per rank): before {losses['before']}, after {losses['after']}")
    print(f"end, load average {load_average()}")

    path = out / f"results-zero3-init-{started:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"rows": rows, "summary": summary, "model": MODEL,
                                "ds_config": ds_config(), "argv": sys.argv,
                                "mmap_threshold": args.malloc_mmap_threshold}, indent=1))
    print(f"raw results: {path}")


if __name__ == "__main__":
    main()
