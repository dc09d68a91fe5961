"""Pareto fronts: the trials no other trial beats on both the metric and a cost."""

from __future__ import annotations

from typing import Any


def pareto_front(rows: list[dict[str, Any]], cost: str, mode: str,
                 metric: str = "metric") -> list[dict[str, Any]]:
    """The non-dominated ``rows`` for (lower ``cost``, better ``metric``), cheapest first.

    A row is dominated when another is at least as good on both and better on one. Rows
    without the cost (a point that could not be measured) are left out.
    """
    sign = 1.0 if mode == "max" else -1.0
    known = [r for r in rows if r.get(cost) is not None and r.get(metric) is not None]
    # cheapest first; among equal costs the best metric first: one sweep keeps each row that
    # beats everything cheaper
    known.sort(key=lambda r: (r[cost], -sign * r[metric]))
    front: list[dict[str, Any]] = []
    for r in known:
        if not front or sign * r[metric] > sign * front[-1][metric]:
            front.append(r)
    return front
