"""GPT: presets, validation, flops formula, activation checkpointing, and that it learns."""

import math

import pytest
import torch

from bigopt.models import GPT, GPT_PRESETS
from bigopt.models import gpt as gpt_module


def tiny(**overrides: object) -> GPT:
    config = dict(vocab_size=32, context=16, n_layer=2, n_head=2, d_model=32)
    return GPT(**{**config, **overrides})


def analytic_params(vocab: int, ctx: int, n_layer: int, d: int) -> tuple[int, int]:
    """(total, non-embedding) params of this architecture, counted by hand."""
    block = 12 * d * d + 13 * d  # ln1, qkv, attn proj, ln2, fc, mlp proj (with biases)
    head = 2 * d + d * vocab  # final LayerNorm + untied, bias-free output projection
    embeddings = vocab * d + ctx * d
    non_embedding = n_layer * block + head
    return non_embedding + embeddings, non_embedding


def meta_preset(name: str) -> GPT:
    with torch.device("meta"):  # no memory allocated, so building gpt2-350m is instant
        return GPT(**GPT_PRESETS[name])


@pytest.mark.parametrize("name", sorted(GPT_PRESETS))
def test_preset_param_counts_match_architecture(name: str) -> None:
    model = meta_preset(name)
    p = GPT_PRESETS[name]
    total, non_emb = analytic_params(p["vocab_size"], p["context"], p["n_layer"], p["d_model"])
    assert model.num_params() == total
    assert model.num_params(non_embedding=True) == non_emb


@pytest.mark.parametrize(
    ("name", "expected", "counted"),
    [
        ("gpt-1m", 1.0e6, "total"),
        ("gpt-10m", 10.7e6, "total"),
        ("gpt2-124m", 124e6, "tied"),
        ("gpt2-350m", 350e6, "tied"),
    ],
)
def test_presets_are_the_size_their_name_says(name: str, expected: float, counted: str) -> None:
    # GPT-2's "124M"/"350M" are tied-weight sizes. With the untied head (needed for pipeline
    # splitting) the model has one extra vocab x d_model matrix, so its tied-equivalent size is
    # the non-embedding count and its real total is ~163M / ~406M.
    model = meta_preset(name)
    n = model.num_params() if counted == "total" else model.num_params(non_embedding=True)
    assert n == pytest.approx(expected, rel=0.15 if name == "gpt-1m" else 0.05)
    if name == "gpt2-124m":
        assert model.num_params() == pytest.approx(163.1e6, rel=0.01)


def test_unknown_config_keys_are_named() -> None:
    from bigopt.models import build_model

    with pytest.raises(ValueError, match="n_layers.*n_layer"):
        build_model("gpt", **{**GPT_PRESETS["gpt-1m"], "n_layers": 2})


def test_default_constructor_is_gpt_1m() -> None:
    assert {k: getattr(GPT(), k) for k in GPT_PRESETS["gpt-1m"]} == GPT_PRESETS["gpt-1m"]


def test_bad_sizes_raise_with_the_field_name() -> None:
    with pytest.raises(ValueError, match=r"d_model \(100\).*n_head \(3\)"):
        GPT(d_model=100, n_head=3)
    with pytest.raises(ValueError, match="n_layer"):
        GPT(n_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        GPT(dropout=1.5)


def test_layers_are_embedding_blocks_head() -> None:
    model = tiny(n_layer=3)
    names = [type(layer).__name__ for layer in model.layers()]
    assert names == ["Embedding", "Block", "Block", "Block", "Head"]


def test_flops_per_sample_is_the_palm_formula() -> None:
    model = GPT(**GPT_PRESETS["gpt-10m"])
    n = model.num_params(non_embedding=True)
    expected = (6 * n + 12 * 6 * 384 * 256) * 256
    assert model.flops_per_sample() == expected
    assert n == model.num_params() - 256 * 384 - 256 * 384


def test_attention_is_causal() -> None:
    model = tiny().eval()
    x, _ = model.example_input(1)
    changed = x.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % model.vocab_size
    torch.testing.assert_close(model(x)[0, :10], model(changed)[0, :10])
    assert not torch.allclose(model(x)[0, 10:], model(changed)[0, 10:])


def test_sequence_longer_than_context_raises() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="context 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_init_scales_residual_projections() -> None:
    torch.manual_seed(0)
    model = GPT(**GPT_PRESETS["gpt-10m"])
    resid = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks])
    other = torch.cat([b.attn.qkv.weight.flatten() for b in model.blocks])
    assert resid.std().item() == pytest.approx(0.02 / math.sqrt(2 * 6), rel=0.05)
    assert other.std().item() == pytest.approx(0.02, rel=0.05)


def test_activation_checkpointing_matches_and_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_checkpoint = gpt_module.checkpoint

    def counting_checkpoint(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(gpt_module, "checkpoint", counting_checkpoint)

    def loss_and_grads(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = tiny(activation_checkpointing=checkpointing).train()
        x, y = model.example_input(2)
        loss = GPT.loss(model(x), y)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_plain, grads_plain = loss_and_grads(False)
    assert calls == []
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    assert calls == [False, False]  # one non-reentrant checkpoint per block
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_checkpointing_is_skipped_in_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpt_module, "checkpoint", lambda *a, **k: pytest.fail("checkpointed"))
    model = tiny(activation_checkpointing=True).eval()
    with torch.no_grad():
        model(model.example_input(1)[0])


def test_tiny_gpt_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = tiny().train()
    x, y = model.example_input(4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = GPT.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(32), rel=0.1)  # ~uniform at init
    assert losses[-1] < 0.5 * losses[0]
