"""Pooled paired differences of the session-21 held-out runs.

python nasbench201_session21_pool.py EVO_FILES RL_FILES > nasbench201_session21_heldout_pooled.txt

EVO_FILES / RL_FILES: comma-separated jsonl outputs of ``nasbench201_session21_reevaluate.py``.
Per searcher and data set: each file, then all of them pooled. new = end4k2 (the default since
session 21), old = the default without re-evaluation; differences are paired by seed.
"""

from __future__ import annotations

import json
import math
import statistics
import sys

DATASETS = ("CIFAR-10", "CIFAR-100", "ImageNet16-120")


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def paired(rows: list[dict], a: str, b: str) -> tuple[float, float, int, int, int]:
    """Mean and s.e. of a - b, and wins / ties / losses."""
    d = [r[a] - r[b] for r in rows]
    wins, losses = sum(x > 0 for x in d), sum(x < 0 for x in d)
    return (statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d)), wins,
            len(d) - wins - losses, losses)


def verdict(mean: float, se: float) -> str:
    return "not shown" if abs(mean) < 1.96 * se else ("better" if mean > 0 else "worse")


def cell(rows: list[dict]) -> str:
    m, se, w, t, lo = paired(rows, "end4k2", "tpe")
    m0, se0, *_ = paired(rows, "default", "tpe")
    g, gse, *_ = paired(rows, "end4k2", "default")
    new, tpe = (statistics.fmean(r[k] for r in rows) for k in ("end4k2", "tpe"))
    return (f"{m:+.3f} +- {se:.3f} ({w}/{t}/{lo}, {verdict(m, se)}; n={len(rows)}) "
            f"[old {m0:+.3f}+-{se0:.3f}; gain {g:+.3f}+-{gse:.3f}; new {new:.3f} tpe {tpe:.3f}]")


def main() -> None:
    for name, files in (("evolution", sys.argv[1]), ("rl", sys.argv[2])):
        parts = [load(f) for f in files.split(",") if f]
        if not parts:
            continue
        for ds in DATASETS:
            samples = [[r for r in rows if r["dataset"] == ds] for rows in parts]
            cells = [cell(rs) if rs else "-" for rs in [*samples, sum(samples, [])]]
            print(name, ds, " | ".join(cells))


if __name__ == "__main__":
    main()
