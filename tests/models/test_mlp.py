"""MLP: layer structure, image input, dropout and validation."""

import pytest
import torch
from torch import nn

from bigopt.models import MLP


def test_one_layer_per_linear() -> None:
    model = MLP(in_features=10, hidden=(8, 6, 4), num_classes=3)
    layers = model.layers()
    assert len(layers) == 4
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 8), (8, 6), (6, 4), (4, 3)]


def test_takes_images_by_flattening() -> None:
    model = MLP(in_features=28 * 28)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_no_hidden_layers_is_logistic_regression() -> None:
    model = MLP(in_features=4, hidden=(), num_classes=2)
    assert len(model.layers()) == 1
    assert model(torch.randn(5, 2, 2)).shape == (5, 2)


def test_dropout_only_when_asked() -> None:
    def count_dropout(model: MLP) -> int:
        return sum(isinstance(m, nn.Dropout) for m in model.modules())

    assert count_dropout(MLP(dropout=0.0)) == 0
    assert count_dropout(MLP(hidden=(8, 8, 8), dropout=0.2)) == 3


def test_flops_are_three_times_two_macs() -> None:
    model = MLP(in_features=10, hidden=(8,), num_classes=3)
    assert model.flops_per_sample() == 3 * 2 * (10 * 8 + 8 * 3)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"hidden": (8, 0)}, r"hidden\[1\]"),
        ({"hidden": 8}, "hidden must be a list"),
        ({"in_features": -1}, "in_features"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_config_raises(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        MLP(**kwargs)
