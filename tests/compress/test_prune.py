"""Pruning: magnitude masks and their schedule, the L1 penalty, and structured pruning whose
result is rebuilt from its arch dict."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bigopt.compress.measure import cpu_latency_ms, param_count, size_bytes_safetensors
from bigopt.compress.prune import (
    L1Regularizer,
    MaskCallback,
    apply_masks,
    cubic_sparsity,
    global_magnitude_masks,
    prunable_weights,
    sparsity_report,
    structured_prune,
)
from bigopt.models import build_model, from_arch

SMALL_CNN = dict(in_channels=1, image_size=28, stem_channels=8, num_classes=10, blocks=[
    {"type": "resnet", "channels": 16, "stride": 2},
    {"type": "resnet", "channels": 16, "stride": 1},  # identity shortcut: couples to the block before
    {"type": "dense", "growth": 8, "layers": 2},
    {"type": "transition", "channels": 16},
    {"type": "plain", "channels": 16, "stride": 1, "kernel": 5},
])


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", in_features=64, hidden=[32, 16], num_classes=10)


def tiny_gpt() -> nn.Module:
    torch.manual_seed(0)
    return build_model("gpt", vocab_size=64, context=16, n_layer=2, n_head=4, d_model=32)


# --- unstructured -------------------------------------------------------------------------------


def test_prunable_weights_are_linear_and_conv_weights_only() -> None:
    gpt = tiny_gpt()
    names = set(prunable_weights(gpt))
    assert "blocks.0.attn.qkv.weight" in names and "head.out.weight" in names
    assert not any(n.endswith("bias") or ".ln" in n or "embedding" in n for n in names)
    cnn = build_model("cnn", **SMALL_CNN)
    assert all(isinstance(cnn.get_submodule(n.rsplit(".", 1)[0]), nn.Conv2d | nn.Linear)
               for n in prunable_weights(cnn))


def test_global_masks_prune_exactly_the_smallest_weights_across_layers() -> None:
    model = mlp()
    with torch.no_grad():  # make the first layer's weights all smaller than everyone else's
        model.stack[0][1].weight.mul_(1e-3)
    masks = global_magnitude_masks(model, 0.5)
    weights = prunable_weights(model)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == int(0.5 * total)
    # one global threshold: every pruned |w| <= every kept |w|
    pruned = torch.cat([w.detach().abs()[~masks[n]] for n, w in weights.items()])
    kept = torch.cat([w.detach().abs()[masks[n]] for n, w in weights.items()])
    assert pruned.max() <= kept.min()
    # one threshold, not one per layer: at 80 % the first layer (2048 of the 2720 weights,
    # all tiny) goes entirely and the others keep most of theirs
    masks = global_magnitude_masks(model, 0.8)
    assert not masks["stack.0.1.weight"].any()
    assert masks["stack.1.0.weight"].float().mean() > 0.5
    assert all(m.all() for m in global_magnitude_masks(model, 0.0).values())
    for bad in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match="sparsity"):
            global_magnitude_masks(model, bad)


def test_apply_masks_zeroes_in_place_by_name() -> None:
    model = mlp()
    masks = global_magnitude_masks(model, 0.7)
    apply_masks(model, masks)
    report = sparsity_report(model)
    assert report["total"]["zeros"] == int(0.7 * report["total"]["numel"])
    assert report["total"]["sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert set(report) == set(prunable_weights(model)) | {"total"}
    assert model.stack[0][1].bias.count_nonzero() == model.stack[0][1].bias.numel()  # biases untouched
    other = mlp()
    apply_masks(other, {name: m.float() for name, m in masks.items()})  # 0/1 float masks work too
    assert sparsity_report(other)["total"]["zeros"] == report["total"]["zeros"]
    with pytest.raises(KeyError, match="nope.weight"):
        apply_masks(model, {"nope.weight": torch.ones(1)})


def test_cubic_schedule() -> None:
    kw = dict(initial=0.1, final=0.9, start=100, end=300)
    assert cubic_sparsity(0, **kw) == pytest.approx(0.1)
    assert cubic_sparsity(100, **kw) == pytest.approx(0.1)
    assert cubic_sparsity(200, **kw) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)
    assert cubic_sparsity(300, **kw) == pytest.approx(0.9)
    assert cubic_sparsity(10_000, **kw) == pytest.approx(0.9)
    values = [cubic_sparsity(t, **kw) for t in range(0, 400, 10)]
    assert values == sorted(values)
    # prunes fastest early: the first half of the ramp covers 7/8 of the way
    assert cubic_sparsity(200, **kw) - 0.1 == pytest.approx(7 / 8 * 0.8)


def test_mask_callback_gradual_pruning_keeps_pruned_weights_at_zero() -> None:
    model = mlp()
    callback = pickle.loads(pickle.dumps(MaskCallback(final_sparsity=0.8, start=5, end=45, frequency=10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # momentum moves pruned weights
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    seen = []
    for step in range(60):
        loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        callback(model, step)
        total = sparsity_report(model)["total"]["sparsity"]
        seen.append(total)
        if step < 5:
            assert total == 0.0
        elif callback.masks is not None:
            for name, w in prunable_weights(model).items():  # re-applied after every step
                assert not w.detach()[~callback.masks[name]].any()
    assert callback.sparsity == pytest.approx(0.8)
    assert seen[-1] == pytest.approx(0.8, abs=1e-3)
    assert seen[15] < seen[25] < seen[35] < seen[45]  # gradual, not one shot


def test_l1_penalty_drives_weights_towards_zero() -> None:
    def train(l1: float) -> float:
        model = mlp()
        torch.manual_seed(1)
        x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        reg = L1Regularizer(l1)
        for _ in range(250):
            loss = model.loss(model(x), y) + reg(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
        w = torch.cat([p.detach().abs().flatten() for p in prunable_weights(model).values()])
        return float((w < 1e-2).float().mean())

    plain, penalized = train(0.0), train(3e-3)
    assert penalized > 0.3 and penalized > 3 * plain, (plain, penalized)
    model = mlp()
    expected = sum(w.detach().abs().sum() for w in prunable_weights(model).values())
    assert float(L1Regularizer(0.5)(model).detach()) == pytest.approx(0.5 * float(expected), rel=1e-5)
    with pytest.raises(ValueError):
        L1Regularizer(-1.0)


# --- structured ---------------------------------------------------------------------------------


def _check_rebuild(model: nn.Module, pruned: nn.Module, arch: dict, x: torch.Tensor) -> nn.Module:
    arch = json.loads(json.dumps(arch))  # plain JSON, as a trial record stores it
    assert pruned.arch() == arch
    rebuilt = from_arch(arch)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in pruned.state_dict().items()}
    rebuilt.load_state_dict(pruned.state_dict())  # strict
    rebuilt.eval()
    pruned.eval()
    with torch.no_grad():
        out = pruned(x)
        assert torch.equal(rebuilt(x), out)
        assert out.shape == model.eval()(x).shape
    assert param_count(pruned) < param_count(model)
    return rebuilt


def test_structured_prune_mlp_halves_hidden_widths() -> None:
    model = mlp()
    x, _ = model.example_input(4)
    before = copy.deepcopy(model.state_dict())
    pruned, arch = structured_prune(model, 0.5, x[:1])
    assert arch["hidden"] == [16, 8] and arch["num_classes"] == 10
    _check_rebuild(model, pruned, arch, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # not in place


def test_structured_prune_cnn_rebuilds_from_arch_and_reloads_from_safetensors(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("cnn", **SMALL_CNN)
    model.train()
    x, _ = model.example_input(3)
    bn = model.stem[1].running_mean.clone()
    pruned, arch = structured_prune(model, 0.5, x[:1])
    assert pruned.training and torch.equal(model.stem[1].running_mean, bn)  # traced in eval mode
    assert arch["stem_channels"] == 4
    assert [b.get("channels", b.get("growth")) for b in arch["blocks"]] == [8, 8, 4, 8, 8]
    assert arch["blocks"][-1]["kernel"] == 5
    _check_rebuild(model, pruned, arch, x)
    save_file(pruned.state_dict(), tmp_path / "model.safetensors")
    reloaded = from_arch(arch)
    reloaded.load_state_dict(load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), pruned.eval()(x))
    assert size_bytes_safetensors(pruned) < 0.4 * size_bytes_safetensors(model)


def test_structured_prune_gpt_removes_ffn_units_and_whole_heads() -> None:
    model = tiny_gpt().eval()
    x, _ = model.example_input(3)
    pruned, arch = structured_prune(model, 0.5, x[:1])
    assert (arch["n_head"], arch["head_dim"], arch["d_ff"], arch["d_model"]) == (2, 8, 64, 32)
    _check_rebuild(model, pruned, arch, x)
    assert from_arch(arch).flops_per_sample() < model.flops_per_sample()

    # Exactly the kept heads and units survive, q, k and v of a head together: the pruned GPT
    # computes what the original computes with the removed heads' and units' outputs zeroed.
    def kept_rows(orig: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        match = (orig[None] == new[:, None]).all(-1)  # [new row, original row]
        assert (match.sum(1) == 1).all()
        return match.float().argmax(1)

    reference = copy.deepcopy(model)
    with torch.no_grad():
        for orig, new, ref in zip(model.blocks, pruned.blocks, reference.blocks, strict=True):
            hd, nh = orig.attn.head_dim, orig.attn.n_head
            rows = kept_rows(orig.attn.qkv.weight, new.attn.qkv.weight)
            heads = rows % (nh * hd) // hd
            for h in set(range(nh)) - set(heads.tolist()):
                ref.attn.proj.weight[:, h * hd:(h + 1) * hd] = 0
            assert sorted(rows.tolist()) == rows.tolist()
            gone = torch.ones(orig.mlp.fc.out_features, dtype=torch.bool)
            gone[kept_rows(orig.mlp.fc.weight, new.mlp.fc.weight)] = False
            ref.mlp.proj.weight[:, gone] = 0
        torch.testing.assert_close(pruned(x), reference(x))


def test_structured_prune_gpt_without_heads_and_keeps_one_head() -> None:
    model = tiny_gpt()
    x, _ = model.example_input(1)
    _, arch = structured_prune(model, 0.5, x, prune_heads=False)
    assert arch["n_head"] == 4 and "head_dim" not in arch and arch["d_ff"] == 64
    _, arch = structured_prune(model, 0.9, x)
    assert arch["n_head"] == 1
    one_head = build_model("gpt", vocab_size=64, context=16, n_layer=1, n_head=1, d_model=32)
    pruned, arch = structured_prune(one_head, 0.5, x)
    assert arch["n_head"] == 1 and "head_dim" not in arch and arch["d_ff"] == 64
    assert pruned(x).shape == one_head(x).shape


def test_structured_prune_refuses_transformer_blocks_and_bad_ratios() -> None:
    model = build_model("cnn", in_channels=1, image_size=28, stem_channels=8, num_classes=10,
                        blocks=[{"type": "transformer", "channels": 8, "heads": 2}])
    x, _ = model.example_input(1)
    with pytest.raises(ValueError, match="'transformer'"):
        structured_prune(model, 0.5, x)
    with pytest.raises(ValueError, match="ratio"):
        structured_prune(mlp(), 1.0, torch.randn(1, 64))


def test_structured_prune_cnn_is_four_times_cheaper_and_faster() -> None:
    torch.manual_seed(0)
    model = build_model("cnn")  # the default Fashion-MNIST CNN (~0.29M params)
    x, _ = model.example_input(1)
    pruned, arch = structured_prune(model, 0.5, x)
    assert from_arch(arch).flops_per_sample() < 0.3 * model.flops_per_sample()
    # batch-1 single-thread latency; the machine is shared, so best of three tries
    ratios = []
    for _ in range(3):
        base = cpu_latency_ms(model, x, repeats=20, warmup=3)["median"]
        small = cpu_latency_ms(pruned, x, repeats=20, warmup=3)["median"]
        ratios.append(small / base)
        if ratios[-1] < 0.8:
            break
    assert min(ratios) < 0.8, ratios
