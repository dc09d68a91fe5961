"""Model cards: built from a real ONNX export, written atomically, read back as plain JSON, and
their how-to-run snippet runs with onnxruntime alone in a fresh interpreter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from bigopt.export.card import ModelCard, read_model_card, write_model_card
from bigopt.export.onnx import export_onnx, onnx_latency_ms
from bigopt.models import build_model

REQUIRED = ["file", "format", "runtime", "inputs", "outputs", "preprocessing", "labels", "metrics",
            "size_bytes", "latency_ms", "parity", "source", "how_to_run"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, image_size=8, stem_channels=4,
                        blocks=[{"type": "resnet", "channels": 8, "stride": 2}])
    x, _ = model.example_input(2)
    return export_onnx(model, (x,), tmp_path_factory.mktemp("card") / "model.onnx")


def make_card(result: dict) -> ModelCard:
    latency = {f"batch_{b}": onnx_latency_ms(result["path"], torch.zeros(b, 1, 8, 8), repeats=3, warmup=1)
               for b in (1, 4)}
    return ModelCard.from_export(
        result,
        preprocessing={"scale": 1 / 16, "mean": [0.5], "std": [0.5], "layout": "NCHW"},
        labels=[str(i) for i in range(10)],
        metrics={"values": {"accuracy": 0.93}, "split": "test", "rows": 360},
        latency_ms=latency,
        source={"model_uri": "s3://bucket/run-1/train/model.safetensors", "stage": "export", "run": "run-1"},
    )


def test_round_trip(exported: dict) -> None:
    card = make_card(exported)
    path = write_model_card(Path(exported["path"]).with_suffix(".card.json"), card)

    raw = json.loads(path.read_text())
    missing = [k for k in REQUIRED if k not in raw]
    assert not missing, missing
    assert raw["file"] == "model.onnx" and raw["format"] == "onnx"
    assert raw["runtime"].startswith("onnxruntime")
    assert raw["inputs"] == [{"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert raw["outputs"][0]["shape"] == ["batch", 10]
    assert raw["size_bytes"] == Path(exported["path"]).stat().st_size
    assert raw["parity"]["max_abs_diff"] <= 1e-4 and raw["parity"]["reference"] == "pytorch fp32"
    assert set(raw["latency_ms"]) == {"batch_1", "batch_4"} and raw["latency_ms"]["batch_4"]["batch"] == 4
    assert raw["metrics"] == {"values": {"accuracy": 0.93}, "split": "test", "rows": 360}
    assert read_model_card(path) == card
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.card.json", "model.onnx"]  # no temp left


def test_how_to_run_needs_only_the_runtime(exported: dict) -> None:
    card = make_card(exported)
    assert "bigopt" not in card.how_to_run
    # a fresh interpreter, in the file's directory, that cannot import bigopt
    script = "import sys; sys.modules['bigopt'] = None\n" + card.how_to_run
    run = subprocess.run([sys.executable, "-I", "-c", script], cwd=Path(exported["path"]).parent,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(1, 10)"


def test_int8_card_takes_io_from_the_fp32_export(exported: dict) -> None:
    int8_result = {"path": "/x/model.int8.onnx", "format": "onnx-int8", "bytes": 1234, "method": "static"}
    card = ModelCard.from_export(int8_result, inputs=exported["inputs"], outputs=exported["outputs"],
                                 parity={"reference": "onnx fp32", "top1_agreement": 0.995, "rows": 397,
                                         "split": "test"})
    assert card.file == "model.int8.onnx" and card.size_bytes == 1234
    assert card.parity.top1_agreement == 0.995 and card.parity.max_abs_diff is None
    assert 'InferenceSession("model.int8.onnx"' in card.how_to_run


@pytest.mark.parametrize(
    "change",
    [{"format": "tflite"}, {"size_bytes": -1}, {"surprise": 1}, {"metrics": {"values": {"accuracy": 1.0}}}],
)
def test_invalid_cards_are_refused(exported: dict, change: dict) -> None:
    with pytest.raises(ValidationError):
        ModelCard.from_export(exported, **change)
