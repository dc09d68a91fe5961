"""The model card written next to every exported file: what goes in, what comes out, how good
and how fast it is, where it came from, and how to run it with its runtime alone.

``ModelCard.from_export(result, ...)`` fills the file, size, inputs, outputs, limits and parity
from what ``export_onnx`` / ``quantize_onnx_int8`` / ``export_pte`` returned; the caller adds
preprocessing, labels, metrics, latency and lineage. ``write_model_card`` writes it as JSON,
atomically; ``read_model_card`` validates one back. Only pydantic and the standard library here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "RUNTIMES",
    "Latency",
    "MetricSet",
    "ModelCard",
    "Parity",
    "TensorSpec",
    "default_how_to_run",
    "read_model_card",
    "write_model_card",
]

Format = Literal["onnx", "onnx-int8", "pte"]

#: What each format needs at run time (the card's default ``runtime``).
RUNTIMES: dict[str, str] = {
    "onnx": "onnxruntime>=1.20", "onnx-int8": "onnxruntime>=1.20", "pte": "executorch>=1.5,<1.6",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    """One input or output: symbolic axes are names ("batch", "seq"), fixed ones sizes."""

    name: str
    shape: list[int | str]
    dtype: str


class MetricSet(_Strict):
    """Quality measured on the exported file itself, e.g. ``{"accuracy": 0.95}`` on "test"."""

    values: dict[str, float]
    split: str
    rows: int = Field(ge=0)


class Latency(_Strict):
    """Milliseconds per call at one batch size."""

    median: float
    p90: float
    batch: int | None = None
    threads: int | None = None
    repeats: int | None = None
    device: str | None = None


class Parity(_Strict):
    """Agreement with the PyTorch model: max abs diff (fp32 files) or top-1 agreement (int8)."""

    reference: str = "pytorch fp32"
    max_abs_diff: float | None = None
    atol: float | None = None
    top1_agreement: float | None = None
    rows: int | None = None
    split: str | None = None


class ModelCard(_Strict):
    """Everything needed to use one exported file without bigopt."""

    card_version: int = 1
    file: str
    format: Format
    runtime: str = ""
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    #: bounds of symbolic axes the file enforces (a .pte reserves memory for them)
    limits: dict[str, int] = Field(default_factory=dict)
    #: what to do to raw data before the file sees it, e.g. {"scale": 1/255, "mean": [..],
    #: "std": [..], "layout": "NCHW"} or {"tokenizer": "tokenizer.json"}
    preprocessing: dict[str, Any] = Field(default_factory=dict)
    labels: list[str] | None = None
    metrics: MetricSet | None = None
    size_bytes: int = Field(ge=0)
    #: e.g. {"batch_1": {...}, "batch_64": {...}}
    latency_ms: dict[str, Latency] = Field(default_factory=dict)
    parity: Parity | None = None
    #: lineage: {"model_uri": ..., "stage": ..., "run": ...}
    source: dict[str, Any] = Field(default_factory=dict)
    how_to_run: str = ""

    @model_validator(mode="after")
    def _defaults(self) -> ModelCard:
        if not self.runtime:
            self.runtime = RUNTIMES[self.format]
        if not self.how_to_run:
            self.how_to_run = default_how_to_run(self.format, self.file, self.inputs, self.limits)
        return self

    @classmethod
    def from_export(cls, result: dict[str, Any], **fields: Any) -> ModelCard:
        """A card from an exporter's result dict; ``fields`` adds or overrides card fields.

        ``file`` is the exported file's base name (cards sit next to their file). For an int8
        result (no inputs/outputs of its own) pass ``inputs``/``outputs`` from the fp32 export.
        """
        base: dict[str, Any] = {
            "file": Path(result["path"]).name,
            "format": result["format"],
            "size_bytes": result["bytes"],
        }
        for key in ("inputs", "outputs", "limits"):
            if key in result:
                base[key] = result[key]
        if result.get("max_abs_diff") is not None:
            base["parity"] = {"max_abs_diff": result["max_abs_diff"], "atol": result.get("atol")}
        return cls(**{**base, **fields})


def _example_shape(spec: TensorSpec, limits: dict[str, int]) -> list[int]:
    sizes = {"batch": 1, "seq": min(limits.get("seq", 8), 8)}
    return [d if isinstance(d, int) else sizes.get(d, 1) for d in spec.shape]


def default_how_to_run(fmt: str, file: str, inputs: list[TensorSpec], limits: dict[str, int]) -> str:
    """A Python snippet that loads ``file`` with its runtime alone and runs one input."""
    spec = inputs[0]
    shape = tuple(_example_shape(spec, limits))
    if fmt in ("onnx", "onnx-int8"):
        return (
            f"# run in the directory that holds {file}\n"
            "import numpy as np\n"
            "import onnxruntime as ort\n\n"
            f'session = ort.InferenceSession("{file}", providers=["CPUExecutionProvider"])\n'
            f"x = np.zeros({shape}, dtype=np.{spec.dtype})  # preprocessed as in 'preprocessing'\n"
            f'outputs = session.run(None, {{"{spec.name}": x}})\n'
            "print(outputs[0].shape)\n"
        )
    make = f"torch.zeros({shape}, dtype=torch.{spec.dtype})"
    bound = f"  # batch <= {limits['batch']}" if "batch" in limits else ""
    return (
        f"# run in the directory that holds {file}\n"
        "import torch\n"
        "from executorch.runtime import Runtime\n\n"
        f'method = Runtime.get().load_program("{file}").load_method("forward")\n'
        f"x = {make}{bound}\n"
        "outputs = method.execute([x])\n"
        "print(outputs[0].shape)\n"
    )


def write_model_card(path: str | os.PathLike[str], card: ModelCard) -> Path:
    """Write ``card`` as JSON to ``path`` atomically (temp file in the same dir, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(card.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_model_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read and validate a card written by ``write_model_card``."""
    return ModelCard.model_validate_json(Path(path).read_text(encoding="utf-8"))
