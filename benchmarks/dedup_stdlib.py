"""exact_dedup and near_dedup on real code (this interpreter's standard library) and at scale.

Part a: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` (site-packages and
dist-packages excluded), read in Ray Data ``map_batches`` into ``{path, text}`` rows; the exact
step, then the near-duplicate step (threshold 0.8, 5-byte shingles, 128 permutations) on what
the exact step kept, as ``data.steps: [{kind: exact_dedup}, {kind: near_dedup}]`` would run.
Prints the counts, example pairs and clusters, and each step's time (the step's call plus
materializing its kept and rejected rows, as the runner does).

Part b: the near-duplicate step alone on synthetic rows (300 random bytes of ``a-z_`` and
space per row; every 10th row an edited copy of the row before it, 3 bytes changed, true
Jaccard ~0.9), generated inside Ray Data, at each size of ``--sizes``: seconds, rows/s, and
the recall of the planted copies (share rejected) and any other row rejected (false merges).

    python benchmarks/dedup_stdlib.py                       # stdlib + 10k and 100k rows
    python benchmarks/dedup_stdlib.py --sizes 10000 100000 1000000
    python benchmarks/dedup_stdlib.py --parts a --rule-bytes 65536   # over-the-rule path

``--rule-bytes`` sets the engine rule's limit (``engine.SINGLE_TASK_MAX_BYTES``, 256 MiB) for
this process: at 64 KiB the stdlib's candidate pairs and their signatures are over it, so they
are verified by the hash join in Ray tasks (``bigopt.data.pair_join``) and clustered in one
task, as 10M rows are; the counts and clusters should not change.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bigopt.data.dedup import exact_duplicates, near_duplicates  # noqa: E402
from bigopt.data.steps import StepContext  # noqa: E402

CTX = StepContext(key="path", content="text", label=None, modality="text", seed=0)
EXACT = SimpleNamespace(kind="exact_dedup")


def near_step(threshold: float = 0.8) -> SimpleNamespace:
    return SimpleNamespace(kind="near_dedup", threshold=threshold, shingle=5, num_perm=128, action="drop")


def stdlib_files() -> tuple[Path, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages"))
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    return root, sorted(found)


def read_files(batch: dict[str, np.ndarray], root: str) -> dict[str, np.ndarray]:
    texts = [(Path(root) / p).read_bytes() for p in batch["path"]]
    return {"path": batch["path"], "text": np.array(texts, dtype=object)}


def timed_step(fn: Any, ds: Any, step: Any) -> tuple[Any, float, int, int]:
    started = time.perf_counter()
    out = fn(ds, step, CTX)
    kept, rejected = out.kept.materialize(), out.rejected.materialize()
    seconds = time.perf_counter() - started
    return out, seconds, kept.count(), rejected.count()


def part_a(ray: Any) -> None:
    root, files = stdlib_files()
    ds = ray.data.from_items([{"path": p} for p in files], override_num_blocks=16).map_batches(
        read_files, fn_kwargs={"root": str(root)}, batch_size=64).materialize()
    n_bytes = sum(len(t) for t in ds.select_columns(["text"]).to_pandas()["text"])
    print(f"== stdlib: {root}: {ds.count()} *.py files, {n_bytes / 1e6:.1f} MB")

    out, seconds, n_kept, n_rej = timed_step(exact_duplicates, ds, EXACT)
    print(f"\n-- exact_dedup: {seconds:.1f} s: {n_kept} kept, {n_rej} rejected "
          f"({out.details['duplicate_groups']} groups of identical files)")
    for ex in out.details["examples"]:
        print(f"   kept {ex['kept']}  ({ex['rows']} identical; e.g. {', '.join(ex['rejected'][:3])})")
    sizes = {r["path"]: len(r["text"]) for r in ds.iter_rows()}
    for ex in out.details["examples"][:5]:
        print(f"   {ex['kept']}: {sizes[ex['kept']]} bytes")

    kept = out.kept.materialize()
    out, seconds, n_kept, n_rej = timed_step(near_duplicates, kept, near_step())
    d = out.details
    print(f"\n-- near_dedup (threshold 0.8, {d['bands']} bands x {d['rows_per_band']} rows) on the "
          f"{kept.count()} rows exact_dedup kept: {seconds:.1f} s: {n_kept} kept, {n_rej} rejected; "
          f"{d['clusters']} clusters holding {d['rows_in_clusters']} files; {d['candidate_pairs']} "
          f"candidate pairs from LSH, {d['verified_pairs']} verified (estimated J >= 0.8)")
    for ex in d["examples"]:
        similar = ", ".join(f"{s['key']} ~{s['jaccard']:.2f}" for s in ex["similar"][:4])
        print(f"   kept {ex['kept']} ({ex['rows']} files): {similar}")
    reasons = sorted(((r["path"], r["reason"]) for r in out.rejected.select_columns(
        ["path", "reason"]).iter_rows()), key=lambda r: r[1])
    others = [r for r in reasons if not r[0].startswith("encodings/")]
    print(f"   rejected outside encodings/ ({len(others)}):")
    for path, reason in sorted(others):
        print(f"     {path}: {reason}")
    print("   the least similar rejected rows (reason):")
    for path, reason in reasons[:5]:
        print(f"     {path}: {reason}")


def synthetic(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Row i: 300 random bytes from a seed of i; every 10th row (i % 10 == 9) is row i - 1 with
    3 bytes changed. The same ids give the same rows in any batch."""
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz_ ", dtype=np.uint8)
    paths, texts = [], []
    for i in batch["id"].tolist():
        base = i - 1 if i % 10 == 9 else i
        text = alphabet[np.random.default_rng(base).integers(0, len(alphabet), length)]
        if base != i:
            rng = np.random.default_rng(10**9 + i)
            text = text.copy()
            text[rng.integers(0, length, 3)] = np.frombuffer(b"#", dtype=np.uint8)[0]
        paths.append(f"row{i:08d}")
        texts.append(text.tobytes())
    return {"path": np.array(paths, dtype=object), "text": np.array(texts, dtype=object)}


def part_b(ray: Any, sizes: list[int]) -> None:
    print("\n== near_dedup scaling: synthetic rows (300 bytes, every 10th an edited copy, J ~0.9)")
    print(f"{'rows':>9} {'seconds':>8} {'rows/s':>8} {'clusters':>8} {'recall':>7} {'false merges':>12}")
    for n in sizes:
        ds = ray.data.range(n, override_num_blocks=max(4, n // 25_000)).map_batches(
            synthetic, fn_kwargs={"length": 300}, batch_size=2000).materialize()
        out, seconds, n_kept, n_rej = timed_step(near_duplicates, ds, near_step())
        assert n_kept + n_rej == n
        rejected = [r["path"] for r in out.rejected.select_columns(["path"]).iter_rows()]
        planted = n // 10
        found = sum(1 for p in rejected if int(p[3:]) % 10 == 9)
        print(f"{n:>9} {seconds:>8.1f} {n / seconds:>8.0f} {out.details['clusters']:>8} "
              f"{found / planted:>7.1%} {len(rejected) - found:>12}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--parts", default="ab")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--rule-bytes", type=int, default=None)
    args = parser.parse_args()
    if args.rule_bytes is not None:
        from bigopt.data import engine

        engine.SINGLE_TASK_MAX_BYTES = args.rule_bytes
    logging.basicConfig(level=logging.INFO, format="   [%(name)s] %(message)s")
    logging.getLogger("ray").setLevel(logging.WARNING)
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"Ray {ray.__version__}, {args.cpus} CPUs, Python {sys.version.split()[0]}")
    if "a" in args.parts:
        part_a(ray)
    if "b" in args.parts:
        part_b(ray, args.sizes)


if __name__ == "__main__":
    main()
