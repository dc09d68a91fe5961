"""The data stage against a plain single-process implementation of the same steps.

Input: Python's standard-library sources (a real corpus: all 1,790 ``.py`` files outside
site-packages, tests included), the first 300, 970 and all of them in sorted order. Steps: the
defaults a text source gets (read + check, incomplete rows, noise filters, exact duplicates,
near duplicates: MinHash + LSH at 0.8), split by path hash, byte windows, Parquet shards.
bigopt runs them through ``bigopt.run(spec, stages=["data"])`` on an embedded Ray started
once, first, and timed on its own; the baseline runs the same steps in one process with
pyarrow/pandas and datasketch's in-memory ``MinHashLSH``. Printed per size: seconds of each,
the ratio (Ray's start-up left out of it, shown beside it), and rows kept/rejected by each.

    python benchmarks/prepare.py                       # 300, 970 and 1,790 files, ~2 minutes
    python benchmarks/prepare.py --sizes 300           # one size
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Iterable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

#: the whole standard library but third-party packages: 1,790 files on Python 3.11
EXCLUDE = ["site-packages/*", "dist-packages/*"]


def bigopt_stage(max_files: int | None, storage: str) -> tuple[float, dict]:
    """The data stage with no ``data.steps``: the defaults for text."""
    import bigopt
    from bigopt.spec import parse_spec

    spec = parse_spec({"name": "prepare-bench", "storage": storage,
                       "data": {"source": {"kind": "text_tree", "path": "stdlib", "max_files": max_files,
                                           "exclude": EXCLUDE},
                                "split": {"val": 0.05}, "context": 256}})
    started = time.perf_counter()
    run = bigopt.run(spec, stages=["data"]).run_uri
    seconds = time.perf_counter() - started
    return seconds, json.load(open(os.path.join(run, "data", "manifest.json")))


def lsh_kept(shingled: Iterable[tuple[str, set[bytes]]], threshold: float = 0.8) -> set[str]:
    """The baseline's near-duplicate step in one process: datasketch MinHash (128 permutations)
    and ``MinHashLSH``, pairs verified at ``threshold``, clusters by union-find with the
    smallest key kept; returns the kept keys."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    sigs = {}
    for key, shingles in shingled:
        m = MinHash(num_perm=128)
        m.update_batch(shingles)
        sigs[key] = m
        lsh.insert(key, m)
    parent = {k: k for k in sigs}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for key, m in sigs.items():
        for other in lsh.query(m):
            if other != key and m.jaccard(sigs[other]) >= threshold:
                a, b = find(key), find(other)
                parent[max(a, b)] = min(a, b)
    return {k for k in sigs if find(k) == k}


def plain(max_files: int | None, out_dir: str) -> tuple[float, dict]:
    """The same steps in one process: pyarrow/pandas and datasketch, no Ray."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bigopt.data.steps import noise_reason
    from bigopt.data.text import list_files, resolve_root
    from bigopt.spec import NoiseStep

    started = time.perf_counter()
    root = resolve_root("stdlib")
    src = __import__("bigopt.spec", fromlist=["TextTreeSource"]).TextTreeSource()
    files = list_files(root, src.include, EXCLUDE, max_files)
    rows = []
    for rel in files:
        data = (root / rel).read_bytes()
        rows.append({"path": rel, "text": data})
    df = pd.DataFrame(rows)
    rejected = 0
    keep = df["text"].map(lambda b: len(b) <= src.max_file_bytes and bool(b.strip()))
    rejected += int((~keep).sum())
    df = df[keep]

    def decodes(b: bytes) -> bool:
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    keep = df["text"].map(decodes)
    rejected += int((~keep).sum())
    df = df[keep]
    step = NoiseStep(kind="noise")  # the default noise filters
    patterns = [re.compile(p) for p in step.reject_patterns]
    keep = df["text"].map(lambda b: noise_reason(b.decode("utf-8"), step, patterns) == "")
    rejected += int((~keep).sum())
    df = df[keep]
    df = df.assign(h=df["text"].map(lambda b: hashlib.sha256(b).hexdigest())).sort_values("path")
    dup = df.duplicated("h", keep="first")
    rejected += int(dup.sum())
    df = df[~dup]
    kept_paths = lsh_kept((path, {s[i:i + 5].encode() for i in range(max(1, len(s) - 4))})
                          for path, s in zip(df["path"], (t.decode("utf-8") for t in df["text"]),
                                             strict=True))
    keep = df["path"].map(lambda p: p in kept_paths)
    rejected += int((~keep).sum())
    df = df[keep]
    kept = len(df)
    os.makedirs(out_dir, exist_ok=True)
    windows = []
    for path, text in zip(df["path"], df["text"], strict=True):
        tokens = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
        u = int.from_bytes(hashlib.blake2b(f"0:{path}".encode(), digest_size=8).digest(), "big") / 2**64
        split = "val" if u < 0.05 else "train"
        for start in range(0, max(len(tokens) - 1, 1), 256):
            chunk = tokens[start:start + 257]
            x = np.zeros(256, np.int32)
            x[:min(len(chunk), 256)] = chunk[:256]
            windows.append({"path": path, "split": split, "input_ids": x})
    table = pa.Table.from_pylist(windows)
    for name in ("train", "val"):
        part = table.filter(pa.compute.equal(table["split"], name))
        pq.write_table(part, os.path.join(out_dir, f"{name}.parquet"))
    return time.perf_counter() - started, {"rows_in": len(files), "rows_kept": kept,
                                           "rows_rejected": rejected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[300, 970, 0],
                        help="files per run; 0: all")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from bigopt.runtime import connect_ray, embedded_cpus

    storage = tempfile.mkdtemp(prefix="bigopt-prepare-bench-")
    load_before = os.getloadavg()
    started = time.perf_counter()
    connect_ray(num_cpus=embedded_cpus(2))  # what bigopt.run would start: 2 workers' worth
    ray_s = time.perf_counter() - started
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.machine()) \
        if os.path.exists("/proc/cpuinfo") else platform.machine()
    print(f"command: python benchmarks/prepare.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"machine: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}; "
          f"load average before {load_before[0]:.2f}")
    print(f"Ray start-up (embedded, once, outside every ratio): {ray_s:.1f} s")
    print("| files | plain s | bigopt s (stage only) | ratio | plain kept/rejected | "
          "bigopt kept/rejected | bigopt steps (s) |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        n = size or None
        base_s, base = plain(n, os.path.join(storage, f"plain-{size}"))
        ours_s, manifest = bigopt_stage(n, storage)
        steps = ", ".join(f"{s['step']} {s.get('seconds', 0)}" for s in manifest.get("steps", []))
        print(f"| {manifest['rows_in']} | {base_s:.1f} | {ours_s:.1f} ({manifest['seconds']:.1f}) | "
              f"**{ours_s / base_s:.2f}** | {base['rows_kept']}/{base['rows_rejected']} | "
              f"{manifest['rows_kept']}/{manifest['rows_rejected']} | {steps} |", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
