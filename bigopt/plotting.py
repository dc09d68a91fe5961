"""One way to draw a figure and hand it back as PNG bytes (reports, search, data quality):
matplotlib's Agg backend, so it works with no screen, in a driver or a Ray worker."""

from __future__ import annotations

import io
from typing import Any


def figure(width: float = 7.0, height: float = 4.0, ncols: int = 1) -> tuple[Any, Any]:
    """(figure, axes) on the Agg backend (a list of ``ncols`` axes side by side when > 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), dpi=110) if ncols > 1 else \
        plt.subplots(figsize=(width, height), dpi=110)


def png(fig: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed (no pyplot state left behind)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
