"""The data stage against a plain single-process implementation of the same steps.

Input: Python's standard-library sources (a real corpus, ~1,800 files). Steps: read + check,
incomplete rows, noise filters, exact duplicates, near duplicates (MinHash + LSH, threshold 0.8),
split by path hash, byte windows, Parquet shards. bigopt runs them as Ray Data transforms
(``bigopt data``, embedded Ray); the baseline runs the same steps in one process with
pyarrow/pandas and datasketch's in-memory ``MinHashLSH``. Printed: rows/s of each and the
ratio, measured in the same run, and the rows kept/rejected by each (they must agree).

    python benchmarks/prepare.py                 # ~3 minutes on 2 cores
    python benchmarks/prepare.py --max-files 400 # quicker
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STEPS = [{"kind": "incomplete"},
         {"kind": "noise", "min_chars": 20, "reject_patterns": ["DO NOT EDIT"]},
         {"kind": "exact_dedup"},
         {"kind": "near_dedup", "threshold": 0.8, "shingle": 5, "num_perm": 128}]


def bigopt_stage(max_files: int | None, storage: str) -> tuple[float, dict]:
    import bigopt
    from bigopt.spec import parse_spec

    spec = parse_spec({"name": "prepare-bench", "storage": storage,
                       "data": {"source": {"kind": "text_tree", "path": "stdlib", "max_files": max_files},
                                "steps": STEPS, "split": {"val": 0.05}, "context": 256}})
    started = time.perf_counter()
    run = bigopt.run(spec, stages=["data"]).run_uri
    seconds = time.perf_counter() - started
    return seconds, json.load(open(os.path.join(run, "data", "manifest.json")))


def plain(max_files: int | None, out_dir: str) -> tuple[float, dict]:
    """The same steps in one process: pyarrow/pandas and datasketch, no Ray."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasketch import MinHash, MinHashLSH

    from bigopt.data.steps import noise_reason
    from bigopt.data.text import list_files, resolve_root
    from bigopt.spec import NoiseStep

    started = time.perf_counter()
    root = resolve_root("stdlib")
    src = __import__("bigopt.spec", fromlist=["TextTreeSource"]).TextTreeSource()
    files = list_files(root, src.include, src.exclude, max_files)
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
    step = NoiseStep(**STEPS[1])
    patterns = [re.compile(p) for p in step.reject_patterns]
    keep = df["text"].map(lambda b: noise_reason(b.decode("utf-8"), step, patterns) == "")
    rejected += int((~keep).sum())
    df = df[keep]
    df = df.assign(h=df["text"].map(lambda b: hashlib.sha256(b).hexdigest())).sort_values("path")
    dup = df.duplicated("h", keep="first")
    rejected += int(dup.sum())
    df = df[~dup]
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    sigs = {}
    for path, text in zip(df["path"], df["text"], strict=True):
        s = text.decode("utf-8")
        m = MinHash(num_perm=128)
        m.update_batch({s[i:i + 5].encode() for i in range(max(1, len(s) - 4))})
        sigs[path] = m
        lsh.insert(path, m)
    parent = {p: p for p in sigs}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for path, m in sigs.items():
        for other in lsh.query(m):
            if other != path and m.jaccard(sigs[other]) >= 0.8:
                a, b = find(path), find(other)
                parent[max(a, b)] = min(a, b)
    keep = df["path"].map(lambda p: find(p) == p)
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
    parser.add_argument("--max-files", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    storage = tempfile.mkdtemp(prefix="bigopt-prepare-bench-")
    base_s, base = plain(args.max_files, os.path.join(storage, "plain"))
    ours_s, manifest = bigopt_stage(args.max_files, storage)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"files: {manifest['rows_in']}")
    print("| implementation | seconds | files/s | kept | rejected |")
    print("|---|---|---|---|---|")
    print(f"| plain (1 process, pandas + datasketch) | {base_s:.1f} | {base['rows_in'] / base_s:.0f} | "
          f"{base['rows_kept']} | {base['rows_rejected']} |")
    print(f"| bigopt data stage (Ray Data, incl. Ray start) | {ours_s:.1f} | "
          f"{manifest['rows_in'] / ours_s:.0f} | {manifest['rows_kept']} | {manifest['rows_rejected']} |")
    print(f"ratio bigopt / plain time: {ours_s / base_s:.2f}")
    for step in manifest.get("steps", []):
        print(f"  {step['step']}: {step['rows_in']} in, {step['kept']} kept, {step['rejected']} "
              f"rejected, {step.get('seconds', 0)} s")


if __name__ == "__main__":
    main()
