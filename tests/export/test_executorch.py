"""ExecuTorch .pte export, run through ExecuTorch's own runtime: parity at several batch sizes up
to the planned bound, a parity failure that leaves no file, and the missing-extra message."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("executorch", reason="the edge extra: pip install 'bigopt[edge]'")

from bigopt.export.card import ModelCard  # noqa: E402
from bigopt.export.executorch import ExportParityError, export_pte, pte_latency_ms, pte_run  # noqa: E402
from bigopt.models import build_model

from factories import CallCounter  # noqa: E402

CNN = {"in_channels": 1, "image_size": 12, "stem_channels": 8, "blocks": [
    {"type": "resnet", "channels": 8, "stride": 1}, {"type": "resnet", "channels": 16, "stride": 2}]}


@pytest.mark.parametrize(("kind", "config"), [("mlp", {"in_features": 20, "hidden": [16], "num_classes": 4}),
                                              ("cnn", CNN)])
def test_pte_parity_through_executorch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, config: dict
) -> None:
    torch.manual_seed(0)
    model = build_model(kind, **config)
    x, _ = model.example_input(3)
    result = export_pte(model, (x,), tmp_path / f"{kind}.pte", max_batch=20)

    assert result["max_abs_diff"] <= 1e-4
    assert [s[0] for s in result["checked_shapes"]] == [3, 4, 20, 1]
    assert result["planned_input_shape"][0] == 20 and result["limits"] == {"batch": 20}
    assert result["dynamic"] == {"batch": True, "seq": False} and "fallback_reason" not in result
    assert result["inputs"][0]["shape"][0] == "batch"
    assert result["outputs"][0]["shape"] == ["batch", 4 if kind == "mlp" else 10]
    assert [p.name for p in tmp_path.iterdir()] == [f"{kind}.pte"]
    assert result["bytes"] == (tmp_path / f"{kind}.pte").stat().st_size

    # independent runs: a batch the export never saw (17 > 15, where a conv guard used to cap
    # the planned memory) and one past the bound, which the runtime refuses
    model.eval()
    other, _ = model.example_input(17)
    with torch.no_grad():
        expected = model(other).numpy()
    np.testing.assert_allclose(pte_run(tmp_path / f"{kind}.pte", other), expected, atol=1e-4, rtol=0)
    too_big, _ = model.example_input(21)
    with pytest.raises(RuntimeError):
        pte_run(tmp_path / f"{kind}.pte", too_big)

    latency = pte_latency_ms(tmp_path / f"{kind}.pte", x[:1], repeats=5, warmup=1)
    assert 0 < latency["median"] <= latency["p90"] and latency["batch"] == 1

    # the card's snippet runs with ExecuTorch alone, next to the file
    card = ModelCard.from_export(result)
    assert "bigopt" not in card.how_to_run and "batch <= 20" in card.how_to_run
    if kind == "mlp":
        namespace: dict = {}
        monkeypatch.chdir(tmp_path)
        exec(compile(card.how_to_run, "how_to_run", "exec"), namespace)
        assert tuple(namespace["outputs"][0].shape) == (1, 4)


def test_pte_parity_error_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "counter.pte"
    pattern = r"ExecuTorch .* max abs diff [0-9.e+-]+ > atol 0.0001"
    with pytest.raises(ExportParityError, match=pattern) as info:
        export_pte(CallCounter(), (torch.randn(3, 4),), target, max_batch=8)
    assert info.value.max_abs_diff > 1e-4
    assert list(tmp_path.iterdir()) == []


def test_gpt_pte_dynamic_batch_and_seq(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("gpt", vocab_size=32, context=8, n_layer=1, n_head=2, d_model=16)
    x, _ = model.example_input(2)
    result = export_pte(model, (x,), tmp_path / "gpt.pte", dynamic_seq=True, max_batch=4)
    assert result["limits"] == {"batch": 4, "seq": 8} and result["max_abs_diff"] <= 1e-4
    assert result["inputs"][0]["shape"] == ["batch", "seq"]
    assert result["outputs"][0]["shape"] == ["batch", "seq", 32]
    model.eval()
    short = torch.randint(0, 32, (3, 5))
    with torch.no_grad():
        expected = model(short).numpy()
    np.testing.assert_allclose(pte_run(tmp_path / "gpt.pte", short), expected, atol=1e-4, rtol=0)


class FourRows(nn.Module):
    """A model that only takes batches of exactly four rows: no dynamic batch possible."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 4:
            raise ValueError("this model takes exactly 4 rows")
        return self.linear(x)


def test_fixed_batch_fallback_is_recorded(tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match="fixed input shape"):
        result = export_pte(FourRows(), (torch.randn(4, 4),), tmp_path / "four.pte")
    assert result["dynamic"] == {"batch": False, "seq": False} and result["limits"] == {}
    assert "batch" in result["fallback_reason"]
    assert result["inputs"][0]["shape"] == [4, 4] and result["checked_shapes"] == [[4, 4]]
    assert result["max_abs_diff"] <= 1e-4
    assert "torch.zeros((4, 4)" in ModelCard.from_export(result).how_to_run


def test_missing_executorch_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "executorch", None)  # what `import executorch` sees uninstalled
    with pytest.raises(ImportError, match=r"pip install 'bigopt\[edge\]'"):
        export_pte(CallCounter(), (torch.randn(2, 4),), tmp_path / "x.pte")
    assert list(tmp_path.iterdir()) == []
