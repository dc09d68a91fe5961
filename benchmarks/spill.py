"""Disk held by Ray's spilled objects during ``bigopt data``: Ray's default spill-file fusing
against bigopt's one object per file (``bigopt.runtime.SPILL_CONFIG``), in one run.

Each try runs ``bigopt data SPEC`` in a subprocess with a small object store (so a 1M-row corpus
spills as 10M rows do with the default store) and samples the session's spill directory every
2 s. Ray's default is restored for the baseline with ``RAY_max_fused_object_count=2000`` (the
user's variable wins over bigopt's setting).

    python benchmarks/spill.py /tmp/bigopt-scaling/storage/scaling-1000000.yaml --out F
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import threading
import time


def spilled_bytes() -> int:
    total = 0
    for d in glob.glob("/tmp/ray/session_*/ray_spilled_objects*"):
        for f in glob.glob(os.path.join(d, "*")):
            try:
                total += os.path.getsize(f)
            except OSError:  # deleted between the listing and the stat
                pass
    return total


def one(spec: str, fused: int | None, store_proportion: float) -> dict:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": str(store_proportion)}
    env.pop("RAY_max_fused_object_count", None)
    if fused is not None:
        env["RAY_max_fused_object_count"] = str(fused)
    trace: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        start = time.perf_counter()
        while not done.is_set():
            trace.append((round(time.perf_counter() - start, 1), spilled_bytes()))
            time.sleep(2)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "bigopt"), "data", spec],
                          capture_output=True, text=True, env=env)
    done.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return {"fused_objects_per_file": fused or "bigopt (1)",
            "seconds": round(time.perf_counter() - started, 1),
            "peak_spilled_gb": round(max(b for _, b in trace) / 1e9, 2),
            "mean_spilled_gb": round(sum(b for _, b in trace) / len(trace) / 1e9, 2),
            "trace": trace}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--store-proportion", type=float, default=0.04)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for fused in (2000, None):  # Ray's default first, then bigopt's
        subprocess.run(["ray", "stop", "--force"], capture_output=True)
        r = one(args.spec, fused, args.store_proportion)
        print(json.dumps({k: v for k, v in r.items() if k != "trace"}), flush=True)
        results.append(r)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"spec": args.spec, "store_proportion": args.store_proportion,
                       "load": os.getloadavg(), "results": results}, fh)


if __name__ == "__main__":
    main()
