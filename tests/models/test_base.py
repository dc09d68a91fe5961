"""The contract every model kind shares (bigopt/models/base.py), checked on small instances."""

import inspect
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bigopt.models import CNN, GPT, MLP, LayeredModel, from_arch
from bigopt.models.base import count_forward_flops

SMALL = {
    "gpt": lambda: GPT(vocab_size=32, context=16, n_layer=2, n_head=2, d_model=16),
    "cnn": lambda: CNN(
        image_size=12,
        stem_channels=8,
        blocks=[
            {"type": "resnet", "channels": 8, "stride": 1},
            {"type": "dense", "growth": 4, "layers": 2},
            {"type": "transition", "channels": 8},
            {"type": "resnet", "channels": 16, "stride": 2},
        ],
    ),
    "mlp": lambda: MLP(in_features=20, hidden=(16, 8), num_classes=5, dropout=0.1),
}
KINDS = sorted(SMALL)


def _model(kind: str) -> LayeredModel:
    torch.manual_seed(0)
    return SMALL[kind]()


@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_layers_in_sequence(kind: str) -> None:
    model = _model(kind).eval()
    x, _ = model.example_input(3)
    h = x
    for layer in model.layers():
        assert isinstance(layer, nn.Module)
        h = layer(h)
        assert isinstance(h, torch.Tensor)  # one tensor in, one tensor out
    torch.testing.assert_close(model(x), h, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_layers_hold_every_parameter(kind: str) -> None:
    # PipelineModule only sees layers(): a parameter outside them would silently not train
    model = _model(kind)
    in_layers = {id(p) for layer in model.layers() for p in layer.parameters()}
    assert in_layers == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("kind", KINDS)
def test_example_input_and_output_shapes(kind: str) -> None:
    model = _model(kind)
    x, y = model.example_input(4)
    out = model(x)
    assert x.shape[0] == y.shape[0] == out.shape[0] == 4
    assert y.dtype == torch.long
    if kind == "gpt":
        assert x.dtype == torch.long and x.shape == y.shape == (4, model.context)
        assert out.shape == (4, model.context, model.vocab_size)
    else:
        assert x.dtype == torch.float32
        assert out.shape == (4, model.num_classes)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_finite_and_reaches_every_parameter(kind: str) -> None:
    model = _model(kind).train()
    x, y = model.example_input(4)
    loss = type(model).loss(model(x), y)  # called as a plain function, as PipelineModule does
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("cls", [GPT, CNN, MLP])
def test_loss_is_a_staticmethod(cls: type) -> None:
    assert isinstance(inspect.getattr_static(cls, "loss"), staticmethod)


@pytest.mark.parametrize("kind", KINDS)
def test_num_params_counts_parameters(kind: str) -> None:
    model = _model(kind)
    assert model.num_params() == sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_flops_match_torch_flop_counter(kind: str) -> None:
    # FlopCounterMode counts 2 x MACs of conv/matmul, the same convention; training = 3 x fwd
    model = _model(kind)
    x, _ = model.example_input(2)
    with FlopCounterMode(display=False) as counter:
        model.eval()(x)
    assert model.flops_per_sample() == pytest.approx(3 * counter.get_total_flops() / 2)


def test_flop_count_leaves_batchnorm_stats_and_mode_alone() -> None:
    model = _model("cnn").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_forward_flops(model, model.example_input(1)[0])
    assert model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_flops_work_on_meta_device(kind: str) -> None:
    # sizing a big model for a cost estimate must not allocate it
    eager = _model(kind).flops_per_sample()
    with torch.device("meta"):
        meta = SMALL[kind]()
    assert meta.flops_per_sample() == pytest.approx(eager)


@pytest.mark.parametrize("kind", KINDS)
def test_arch_round_trips_through_json(kind: str) -> None:
    model = _model(kind).eval()
    arch = json.loads(json.dumps(model.arch()))
    assert arch["kind"] == kind
    clone = from_arch(arch).eval()
    assert clone.arch() == model.arch()
    clone.load_state_dict(model.state_dict())  # same parameter names and shapes
    x, _ = model.example_input(2)
    torch.testing.assert_close(clone(x), model(x))
