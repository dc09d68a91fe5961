"""The ``export`` section: which files the export stage writes, and the budget that picks the
variant to ship.

    export:
      formats: [onnx, onnx_int8, pte]
      variants: all            # or final, or a list of variant names
      budget: {max_bytes: 400000, max_latency_ms: 1.0}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from bigopt.sections import Section as _Section


class BudgetSpec(_Section):
    max_bytes: int | None = Field(None, ge=1, description="Largest file (bytes) to ship.")
    max_latency_ms: float | None = Field(None, gt=0, description="Slowest batch-1 CPU latency.")
    metric: Literal["auto", "accuracy", "perplexity"] = "auto"


class ExportSpec(_Section):
    formats: list[Literal["onnx", "onnx_int8", "pte"]] = Field(
        default_factory=lambda: ["onnx", "onnx_int8", "pte"], min_length=1)
    variants: Literal["all", "final"] | list[str] = Field(
        "all", description="Compress variants to export (all, the final one, or names); the "
                           "input model when there was no compress stage.")
    atol: float = Field(1e-4, gt=0, description="Largest |runtime - PyTorch| output difference "
                        "accepted for fp32 files; an export beyond it fails and keeps nothing.")
    calibration_rows: int = Field(256, ge=1, description="onnx_int8: rows of the train split "
                                  "that calibrate static (QDQ) quantization of conv models.")
    eval_rows: int = Field(10000, ge=1, description="Rows each exported file is evaluated on "
                           "with its own runtime.")
    latency_repeats: int = Field(20, ge=3, description="Timed repeats per latency figure.")
    budget: BudgetSpec | None = None
