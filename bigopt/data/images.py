"""Image classification sources as rows: scikit-learn's bundled ``digits`` (1,797 real 8x8
scans of handwritten digits, shipped inside the package, so nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import numpy as np


def load_digits_rows(max_rows: int | None = None) -> list[dict[str, Any]]:
    """Rows ``{id, inputs [1, 8, 8] float32 in [0, 1], labels}``; ``id`` keys the split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    rows = [{"id": f"digits-{i:05d}", "inputs": images[i], "labels": int(digits.target[i])}
            for i in range(len(images))]
    return rows[:max_rows] if max_rows else rows


def check_image_row(row: dict[str, Any]) -> str:
    """Reject reason for an image row, or '' when it is usable."""
    x = row["inputs"]
    if x is None or not np.all(np.isfinite(x)):
        return "incomplete: missing or non-finite pixels"
    if row["labels"] is None or int(row["labels"]) < 0:
        return "incomplete: no label"
    return ""
