"""How the data stage grows with the rows: synthetic text at 10k, 100k, 1M and 10M rows.

Input (generated once per size, Parquet, 100k rows per file): row ``i`` is 300 random bytes of
``a-z_`` and space; every 10th row (``i % 10 == 9``) is row ``i - 1`` with 3 bytes changed (true
Jaccard of 5-byte shingles ~0.9: a planted near-copy) and every 50th (``i % 50 == 25``) a
byte-identical copy of row ``i - 1`` (a planted exact copy). Key: ``row<i>``.

Each size runs ``bigopt data`` (the CLI, a fresh process, so its peak RSS is the driver's
own) on a ``table`` source with **no** ``data.steps``, i.e. the text defaults (incomplete,
noise, exact_dedup, near_dedup at 0.8), then the split and Parquet shards, engine ``auto``
(so the small sizes take the single-task path and the large ones Ray Data: the engine rule
of ``bigopt/data/engine.py``). Read from the run's manifest: the stage's seconds, each step's
seconds, near_dedup's three phases (signatures; LSH buckets and candidate pairs; verification,
clusters and each row's decision), the driver's peak RSS and the largest task argument.
Recall: the share of planted copies rejected by their step; false merges: any other row
rejected by a dedup step. The load average (1 min) is recorded before and after each size;
a size whose load before exceeded ``--max-load`` (the run itself, busy on every core, raises
the load after it) is rerun (after a pause) up to ``--tries``
times, and every try is printed.

The single-process baseline (pandas + datasketch's ``MinHashLSH``, the same steps in one
process, its near-duplicate part ``benchmarks/prepare.py``'s ``lsh_kept`` on byte shingles)
runs at the sizes given by ``--baseline`` in a
subprocess with a one-hour limit.

    python benchmarks/scaling.py --sizes 10000 100000 1000000 10000000 --baseline 10000 100000 1000000
    python benchmarks/scaling.py --sizes --baseline 10000000   # the baseline alone
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROWS_PER_FILE = 100_000
LENGTH = 300
ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz_ ", dtype=np.uint8)


def planted(i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(near copies, exact copies) among row ids ``i``."""
    return i % 10 == 9, i % 50 == 25


def corpus(n: int, root: str) -> str:
    """Write ``n`` synthetic rows as Parquet under ``root/rows_<n>`` (once); its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(root, f"rows_{n}")
    if os.path.exists(path + ".done"):
        return path
    os.makedirs(path, exist_ok=True)
    for f, start in enumerate(range(0, n, ROWS_PER_FILE)):
        ids = np.arange(start, min(n, start + ROWS_PER_FILE))
        rng = np.random.default_rng(f)
        text = ALPHABET[rng.integers(0, len(ALPHABET), (len(ids), LENGTH))]
        near, exact = planted(ids)
        for j in np.flatnonzero((near | exact) & (ids > start)):
            text[j] = text[j - 1]
            if near[j]:
                text[j, rng.integers(0, LENGTH, 3)] = ord("#")
        table = pa.table({"id": [f"row{i:08d}" for i in ids],
                          "text": [row.tobytes().decode() for row in text]})
        pq.write_table(table, os.path.join(path, f"part-{f:05d}.parquet"))
    open(path + ".done", "w").close()
    return path


def spec(path: str, storage: str, engine: str = "auto") -> dict:
    return {"name": "scaling", "storage": storage,
            "data": {"source": {"kind": "table", "format": "parquet", "path": path, "text": "text",
                                "id": "id"},
                     "split": {"val": 0.05}, "context": 256, "cache": False, "engine": engine}}


def rejected_ids(run: str, step: str) -> np.ndarray:
    import pyarrow.dataset as pads

    folders = [d for d in os.listdir(os.path.join(run, "data", "rejects")) if d.endswith(step)] \
        if os.path.isdir(os.path.join(run, "data", "rejects")) else []
    ids = []
    for d in folders:
        table = pads.dataset(os.path.join(run, "data", "rejects", d), format="parquet").to_table(
            columns=["path"])  # the source's id column is the rows' key, "path"
        ids.append(np.array([int(k[3:]) for k in table["path"].to_pylist()], dtype=np.int64))
    return np.concatenate(ids) if ids else np.empty(0, np.int64)


def bigopt_size(n: int, path: str, storage: str, engine: str = "auto") -> dict:
    spec_path = os.path.join(storage, f"scaling-{n}.yaml")
    os.makedirs(storage, exist_ok=True)
    with open(spec_path, "w") as fh:
        json.dump(spec(path, storage, engine), fh)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "bigopt"), "data", spec_path],
                          capture_output=True, text=True, env={**os.environ,
                                                               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    if proc.returncode:
        raise RuntimeError(f"bigopt data failed at {n} rows:\n{proc.stderr[-3000:]}")
    runs = sorted((os.path.join(storage, "scaling", d) for d in os.listdir(os.path.join(storage, "scaling"))),
                  key=os.path.getmtime)
    run = runs[-1]
    manifest = json.load(open(os.path.join(run, "data", "manifest.json")))
    steps = {s["step"]: s for s in manifest["steps"]}
    ids = np.arange(n)
    near, exact = planted(ids)
    rej_near, rej_exact = rejected_ids(run, "near_dedup"), rejected_ids(run, "exact_dedup")
    dedup_rejected = np.concatenate([rej_near, rej_exact])
    false = np.setdiff1d(dedup_rejected, np.flatnonzero(near | exact)).size
    phases = steps.get("near_dedup", {}).get("details", {}).get("phase_seconds", {})
    return {"rows": n, "wall_s": round(wall, 1), "stage_s": manifest.get("seconds"),
            "engine": steps.get("near_dedup", {}).get("engine"),
            "steps_s": {k: s["seconds"] for k, s in steps.items()},
            "near_phases_s": phases,
            "near_recall": round(np.isin(np.flatnonzero(near), rej_near).mean(), 4),
            "exact_recall": round(np.isin(np.flatnonzero(exact), rej_exact).mean(), 4),
            "false_merges": int(false),
            "rows_in": manifest.get("rows_in"), "rows_kept": manifest.get("rows_kept"),
            "rows_rejected": manifest.get("rows_rejected"),
            "driver": manifest.get("driver"), "load_before": round(load_before, 2),
            "load_after": round(load_after, 2), "run": run}


def plain(path: str) -> dict:
    """The same steps in one process (pandas + datasketch), no Ray."""
    import re

    import pyarrow.dataset as pads
    from prepare import lsh_kept  # benchmarks/prepare.py: the same near-duplicate baseline

    from bigopt.data.spec import NoiseStep
    from bigopt.data.steps import noise_reason

    started = time.perf_counter()
    df = pads.dataset(path, format="parquet").to_table().to_pandas()
    rows_in, rejected = len(df), 0
    keep = df["text"].map(lambda t: isinstance(t, str) and bool(t.strip()))
    rejected += int((~keep).sum())
    df = df[keep]
    step = NoiseStep(kind="noise")
    patterns = [re.compile(p) for p in step.reject_patterns]
    keep = df["text"].map(lambda t: noise_reason(t, step, patterns) == "")
    rejected += int((~keep).sum())
    df = df[keep].assign(h=df["text"].map(lambda t: hashlib.sha256(t.encode()).hexdigest()))
    dup = df.sort_values("id").duplicated("h", keep="first")
    rejected += int(dup.sum())
    df = df[~dup]
    kept_ids = lsh_kept((key, {b[i:i + 5] for i in range(max(1, len(b) - 4))})
                        for key, b in zip(df["id"], (t.encode() for t in df["text"]), strict=True))
    keep = df["id"].map(lambda k: k in kept_ids)
    rejected += int((~keep).sum())
    return {"seconds": round(time.perf_counter() - started, 1), "rows_in": rows_in,
            "rows_kept": int(keep.sum()), "rows_rejected": rejected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
                        help="rows per bigopt run (none: only the --baseline sizes)")
    parser.add_argument("--baseline", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--root", default="/tmp/bigopt-scaling")
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--engine", default="auto", choices=["auto", "single", "distributed"],
                        help="data.engine (auto: the size rule)")
    parser.add_argument("--json", default=None, help="append one JSON line per result here")
    parser.add_argument("--plain-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_one:  # the baseline's own subprocess
        print(json.dumps(plain(args.plain_one)))
        return
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"{open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}",
          flush=True)

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    for n in sorted(set(args.sizes) | set(args.baseline)):
        path = corpus(n, args.root)
        for attempt in range(1, args.tries + 1) if n in args.sizes else ():
            while os.getloadavg()[0] > args.max_load and attempt < args.tries:
                time.sleep(20)  # wait for a quiet machine before the try
            record = bigopt_size(n, path, os.path.join(args.root, "storage"), args.engine)
            record.update(kind="bigopt", attempt=attempt)
            emit(record)
            # the run's own 2 busy cores raise the load after it: only the load before says
            # whether something else was running
            if record["load_before"] <= args.max_load:
                break
        if n in args.baseline:
            load_before = os.getloadavg()[0]
            try:
                out = subprocess.run([sys.executable, __file__, "--plain-one", path],
                                     capture_output=True, text=True, timeout=3600)
                if out.returncode:  # e.g. killed for memory: say so instead of a traceback here
                    record = {"seconds": None, "note": f"exit {out.returncode}: {out.stderr[-500:]}"}
                else:
                    record = json.loads(out.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                record = {"seconds": None, "note": "did not finish within an hour"}
            # the largest child's peak RSS so far (this one, if it ran alone)
            record["children_peak_rss_mb"] = round(
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
            emit({"kind": "baseline", "rows": n, **record, "load_before": round(load_before, 2),
                  "load_after": round(os.getloadavg()[0], 2)})


if __name__ == "__main__":
    main()
