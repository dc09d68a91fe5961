"""The search's plots: best-so-far curve over all trials, and the Pareto fronts."""

from __future__ import annotations

from typing import Any

from bigopt.plotting import figure as _figure
from bigopt.plotting import png as _png


def best_so_far_plot(done: list[dict[str, Any]], metric: str, mode: str) -> bytes:
    """Every completed trial's metric in completion order, and the best so far."""
    fig, ax = _figure()
    values = [r["metric"] for r in done]
    best, running = [], None
    for v in values:
        running = v if running is None else (max(running, v) if mode == "max" else min(running, v))
        best.append(running)
    xs = range(1, len(values) + 1)
    ax.scatter(xs, values, s=14, alpha=0.6, label="trial")
    ax.step(xs, best, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial (completion order)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def pareto_plot(done: list[dict[str, Any]], front: list[dict[str, Any]], cost: str, metric: str) -> bytes:
    fig, ax = _figure()
    measured = [r for r in done if r.get(cost) is not None]
    ax.scatter([r[cost] for r in measured], [r["metric"] for r in measured], s=14, alpha=0.5,
               label="trial")
    ax.step([r[cost] for r in front], [r["metric"] for r in front], "o-", where="post",
            color="C3", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel({"params": "parameters", "flops": "forward FLOPs / sample",
                   "latency_ms": "CPU latency, batch 1 (ms)"}.get(cost, cost))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)
