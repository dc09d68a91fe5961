"""torchao int8 PTQ and QAT on CPU, and the measurement helpers used to report them."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from bigopt.compress.measure import (
    accuracy,
    cpu_latency_ms,
    param_count,
    perplexity,
    size_bytes_safetensors,
)
from bigopt.compress.quantize import (
    QATPrepare,
    can_run,
    ptq,
    qat_convert,
    quantized_layers,
    quantized_size_bytes,
)
from bigopt.models import build_model
from bigopt.tasks import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_thread")


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "mlp": build_model("mlp", in_features=64, hidden=[32, 16], num_classes=10),
        "cnn": build_model("cnn", in_channels=1, image_size=28, stem_channels=8, num_classes=10,
                           blocks=[{"type": "resnet", "channels": 16, "stride": 2}]),
        "gpt": build_model("gpt", vocab_size=64, context=16, n_layer=2, n_head=2, d_model=32),
    }


LINEARS = {
    "mlp": ["stack.0.1", "stack.1.0", "stack.2.0"],
    "cnn": ["head.2"],  # convolutions are not quantized by torchao's int8 configs
    "gpt": [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    + ["head.out"],
}


@pytest.mark.parametrize("mode", ["int8_dynamic", "int8_weight_only"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "gpt"])
def test_ptq_quantizes_every_linear_and_stays_close(kind: str, mode: str) -> None:
    model = models()[kind].eval()
    assert can_run(mode, model) is None
    x, _ = model.example_input(4)
    with torch.no_grad():
        ref = model(x)
    quantized = ptq(model, mode)
    assert quantized_layers(quantized) == LINEARS[kind]
    assert quantized_layers(model) == []  # a copy was quantized
    with torch.no_grad():
        out = quantized(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_int8_checkpoint_is_over_3_5x_smaller() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", in_features=256, hidden=[256, 256], num_classes=10)
    fp32 = quantized_size_bytes(model)
    for mode in ("int8_dynamic", "int8_weight_only"):
        assert fp32 / quantized_size_bytes(ptq(model, mode)) > 3.5
    # measured the same way, the float checkpoint is the safetensors size plus pickle framing
    assert abs(fp32 - size_bytes_safetensors(model)) < 0.05 * fp32


def test_qat_prepare_train_convert_matches_the_fake_quantized_model() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[32, 16], num_classes=10)
    plain_keys = set(model.state_dict())
    prepare = pickle.loads(pickle.dumps(QATPrepare()))  # travels to workers as a hook
    model = prepare(model)
    assert quantized_layers(model) == LINEARS["mlp"]
    assert set(model.state_dict()) == plain_keys  # a QAT checkpoint loads into a plain model
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # gradients pass through the fake quantization
    model.eval()
    with torch.no_grad():
        fake = model(x)
    converted = qat_convert(model)
    assert quantized_layers(converted) == LINEARS["mlp"]
    assert all("Tensor" in type(converted.get_submodule(n).weight).__name__ for n in LINEARS["mlp"])
    with torch.no_grad():
        torch.testing.assert_close(converted(x), fake, atol=1e-4, rtol=1e-4)
    assert quantized_size_bytes(converted) < quantized_size_bytes(build_model("mlp", in_features=64,
                                                                              hidden=[32, 16]))


def test_qat_on_gpt_runs_forward_backward_and_converts() -> None:
    model = QATPrepare()(models()["gpt"])
    x, y = model.example_input(2)
    model.loss(model(x), y).backward()
    assert model.blocks[0].mlp.fc.weight.grad is not None
    model.eval()
    with torch.no_grad():
        fake = model(x)
        torch.testing.assert_close(qat_convert(model)(x), fake, atol=1e-4, rtol=1e-4)


def test_can_run_explains_what_cannot_run() -> None:
    mlp = models()["mlp"]
    assert can_run("qat_int8", mlp) is None
    assert "unknown quantization mode 'int4'" in can_run("int4", mlp)
    assert "no nn.Linear" in can_run("int8_dynamic", nn.Sequential(nn.Conv2d(1, 4, 3)))
    assert "group_size=48" in can_run("qat_int8", mlp, group_size=48)
    with pytest.raises(ValueError, match="no nn.Linear"):
        ptq(nn.Sequential(nn.Conv2d(1, 4, 3)), "int8_dynamic")
    with pytest.raises(ValueError, match="QATPrepare first"):
        qat_convert(mlp)


# --- measure ------------------------------------------------------------------------------------


def test_measurements_of_a_model() -> None:
    model = models()["mlp"]
    assert param_count(model) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert size_bytes_safetensors(model) >= 4 * param_count(model)
    old = torch.get_num_threads()
    lat = cpu_latency_ms(model, torch.randn(1, 64), repeats=5, warmup=1, threads=1)
    assert 0 < lat["median"] <= lat["p90"] and torch.get_num_threads() == old
    assert model.training  # put back in its mode

    x = torch.randn(20, 64)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    y = pred.clone()
    y[:5] = (y[:5] + 1) % 10  # 5 of 20 wrong
    assert accuracy(model, [(x[:8], y[:8]), (x[8:], y[8:])]) == pytest.approx(0.75)


def test_size_of_tied_weights_and_perplexity() -> None:
    tied = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    tied[1].weight = tied[0].weight  # shared storage: safetensors alone would refuse it
    assert size_bytes_safetensors(tied) >= 2 * 8 * 8 * 4

    gpt = models()["gpt"]
    x, y = gpt.example_input(2)
    y[0, :4] = IGNORE_INDEX
    with torch.no_grad():
        logits = gpt(x)
    keep = y != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    assert perplexity(gpt, [(x[:1], y[:1]), (x[1:], y[1:])]) == pytest.approx(float(nll.exp()), rel=1e-4)
    with pytest.raises(TypeError, match="quantized_size_bytes"):
        size_bytes_safetensors(ptq(gpt, "int8_weight_only"))
