"""Pruning: unstructured magnitude masks (with a gradual schedule), an L1 penalty, and
structured pruning that physically removes channels, hidden units and attention heads.

Unstructured pruning (``global_magnitude_masks``, ``MaskCallback``) zeroes individual weights:
the model keeps its shapes (and its dense FLOPs), and what it buys is compressibility and the
sparsity a sparse kernel could exploit. Structured pruning (``structured_prune``) removes whole
rows/filters through Torch-Pruning's dependency graph, so the result is a smaller dense model
that is faster everywhere, and its shape is written back into an ``arch`` dict that
``bigopt.models.from_arch`` rebuilds.

Which weights are "prunable": the ``weight`` of every ``nn.Linear`` and ``nn.Conv*`` (what
Han et al. 2015 and Zhu & Gupta 2017 prune). Biases and norm parameters are left alone: they
are a tiny fraction of the parameters and removing them hurts accuracy out of proportion.
Embedding tables are left out as well: a lookup does no multiply, so zeros in it save no
compute, and the rows of rare tokens would be pruned only because they are rarely updated.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

_PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{parameter name: weight}`` of every Linear/Conv layer, in ``named_parameters`` naming.

    A weight shared by two layers appears once, under its first name.
    """
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _PRUNABLE) and isinstance(getattr(module, "weight", None), Tensor):
            if id(module.weight) in seen:
                continue
            seen.add(id(module.weight))
            out[f"{module_name}.weight" if module_name else "weight"] = module.weight
    return out


def _check_sparsity(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


@torch.no_grad()
def global_magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, Tensor]:
    """Boolean keep-masks (True = keep) for global magnitude pruning at ``sparsity``.

    One threshold over all prunable weights together (Han et al. 2015), not one per layer:
    layers with many small weights (typically the big ones) lose more, which costs less
    accuracy than a uniform per-layer rate. Exactly ``int(sparsity * total)`` weights are
    pruned, the smallest ``|w|`` first; ties (notably the zeros of weights already pruned)
    are broken by position, so re-pruning at a higher sparsity always keeps the old zeros.
    """
    sparsity = _check_sparsity("sparsity", sparsity)
    weights = prunable_weights(model)
    if not weights:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv weights to prune")
    # float32 scores on the weights' device; one flat copy of the prunable weights
    scores = torch.cat([w.detach().abs().float().reshape(-1) for w in weights.values()])
    n_prune = int(sparsity * scores.numel())
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        keep[torch.topk(scores, n_prune, largest=False, sorted=False).indices] = False
    masks, offset = {}, 0
    for name, w in weights.items():
        masks[name] = keep[offset : offset + w.numel()].view(w.shape)
        offset += w.numel()
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero, in place, every weight entry whose mask is False (or 0), by parameter name.

    A pure in-place write on ``param.data``, so it works on a plain module and, once the
    caller has gathered the parameters, on a ZeRO-3 partitioned one.
    """
    params = dict(model.named_parameters())
    missing = sorted(set(masks) - set(params))
    if missing:
        raise KeyError(f"masks name parameters the model does not have: {', '.join(missing)}")
    for name, mask in masks.items():
        p = params[name]
        if mask.shape != p.shape:
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(p.shape)}")
        if mask.dtype == torch.bool:  # no float copy of the mask per call (it runs every step)
            p.data.masked_fill_(~mask.to(p.device, non_blocking=True), 0)
        else:
            p.data.mul_(mask.to(device=p.device, dtype=p.dtype))


def cubic_sparsity(step: int, *, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta (2017) gradual schedule: ``s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``.

    ``initial`` before ``start``, ``final`` from ``end`` on, and in between a cubic that prunes
    fast while there are many redundant weights and slowly near the end.
    """
    if end < start:
        raise ValueError(f"end ({end}) must be >= start ({start})")
    if step <= start and end > start:
        return float(initial)
    if step >= end:
        return float(final)
    frac = (step - start) / (end - start)
    return float(final + (initial - final) * (1.0 - frac) ** 3)


@dataclass
class MaskCallback:
    """Step callback ``callback(model, step)`` for gradual magnitude pruning.

    Every ``frequency`` steps from ``start`` to ``end`` (and at ``end`` itself) the masks are
    recomputed at ``cubic_sparsity(step)``; after every step from ``start`` on they are
    re-applied, so weights the optimizer moved away from zero (momentum, Adam) are zeroed
    again. Steps before ``start`` are untouched. If the callback starts past ``start`` with no
    masks (a worker resumed from a checkpoint), it computes them at the current step's target.

    Small and picklable (it is shipped to Ray workers before training): ``masks`` is built on
    the worker and is not an init argument.
    """

    final_sparsity: float
    end: int
    start: int = 0
    initial_sparsity: float = 0.0
    frequency: int = 100
    masks: dict[str, Tensor] | None = field(default=None, init=False, repr=False)
    sparsity: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        _check_sparsity("initial_sparsity", self.initial_sparsity)
        _check_sparsity("final_sparsity", self.final_sparsity)
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"need 0 <= start <= end, got start={self.start}, end={self.end}")
        if isinstance(self.frequency, bool) or not isinstance(self.frequency, int) or self.frequency < 1:
            raise ValueError(f"frequency must be a positive int, got {self.frequency!r}")

    def due(self, step: int) -> bool:
        """Whether the masks are recomputed at ``step``."""
        if step < self.start:
            return False
        if self.masks is None:
            return True
        on_grid = (step - self.start) % self.frequency == 0
        return (on_grid and step <= self.end) or step == self.end

    def __call__(self, model: nn.Module, step: int) -> None:
        if step < self.start:
            return
        if self.due(step):
            self.sparsity = cubic_sparsity(step, initial=self.initial_sparsity, final=self.final_sparsity,
                                           start=self.start, end=self.end)
            self.masks = global_magnitude_masks(model, self.sparsity)
        assert self.masks is not None
        apply_masks(model, self.masks)


@dataclass(frozen=True)
class L1Regularizer:
    """``weight * sum |w|`` over the prunable weights; add it to the loss.

    An L1 penalty pushes unimportant weights towards zero during training, so a later
    magnitude pruning removes less that matters. Computed in float32.
    """

    weight: float

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float) or self.weight < 0:
            raise ValueError(f"L1 weight must be a float >= 0, got {self.weight!r}")

    def __call__(self, model: nn.Module) -> Tensor:
        terms = [w.float().abs().sum() for w in prunable_weights(model).values()]
        if not terms:
            raise ValueError(f"{type(model).__name__} has no Linear/Conv weights to regularize")
        return self.weight * torch.stack(terms).sum()


@torch.no_grad()
def sparsity_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{weight name: {numel, zeros, sparsity}}`` per prunable layer, plus ``"total"``."""
    report: dict[str, dict[str, float]] = {}
    numel = zeros = 0
    for name, w in prunable_weights(model).items():
        n, z = w.numel(), int((w == 0).sum())
        report[name] = {"numel": n, "zeros": z, "sparsity": z / n if n else 0.0}
        numel, zeros = numel + n, zeros + z
    report["total"] = {"numel": numel, "zeros": zeros, "sparsity": zeros / numel if numel else 0.0}
    return report


# --- structured pruning -------------------------------------------------------------------------


def structured_prune(
    model: nn.Module, ratio: float, example_input: Tensor, *, prune_heads: bool = True, inplace: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Remove ``ratio`` of the channels / hidden units / heads of every prunable layer.

    Returns ``(pruned_model, new_arch)`` where ``bigopt.models.from_arch(new_arch)`` builds a
    model with exactly the pruned model's parameter names and shapes, so a pruned checkpoint
    (e.g. a safetensors state dict) loads into a fresh build anywhere.

    Torch-Pruning's dependency graph finds which layers must lose the same channels (a
    residual add couples the block's output, its shortcut and the stem; a dense block's
    concatenation maps each layer's growth channels into every later input) and the L1 norm of
    each coupled group decides what goes (``MagnitudeImportance(p=1)``). Pruning is local, the
    same ratio per group, so that every width of the result is expressible in the arch dict:

    * MLP: every hidden width (``hidden: [256, 128] -> [128, 64]``); the output layer is kept.
    * CNN: the stem, each resnet/plain block's inner ``width`` and output ``channels``, dense
      ``growth`` and transition ``channels``; the classifier is kept. ``transformer`` blocks
      are not supported (ValueError).
    * GPT: the feed-forward hidden units (``d_ff``) and, with ``prune_heads``, whole attention
      heads (``n_head``; ``head_dim`` is kept). ``d_model`` (the residual stream, embeddings,
      LM head) is kept. At least one head is always kept.

    The model is put in eval mode while it is traced (BatchNorm statistics are not updated by
    the example batch). Unless ``inplace``, a copy is pruned and ``model`` is left as it was.
    """
    import torch_pruning as tp

    from bigopt.models import CNN, GPT, MLP, from_arch
    from bigopt.models.cnn import AttentionBlock

    ratio = _check_sparsity("ratio", ratio)
    if not isinstance(model, MLP | CNN | GPT):
        raise ValueError(
            f"structured_prune supports bigopt MLP, CNN and GPT models, got {type(model).__name__}"
        )
    if isinstance(model, CNN):
        for i, block in enumerate(model.body):
            if isinstance(block, AttentionBlock):
                raise ValueError(f"structured_prune does not support CNN block type 'transformer' "
                                 f"(blocks[{i}]); use unstructured pruning for this model")
    if not inplace:
        model = copy.deepcopy(model)

    ignored: list[nn.Module] = []
    num_heads: dict[nn.Module, int] = {}
    head_ratio = 0.0
    if isinstance(model, MLP):
        ignored.append(model.stack[-1][-1])  # output layer: keeps num_classes
    elif isinstance(model, CNN):
        ignored.append(model.head[-1])  # classifier
    else:
        # Keep d_model: a group is only pruned if none of the layers whose *outputs* it would
        # shrink is ignored, so ignoring every writer into the residual stream (embeddings,
        # attention and FFN output projections) freezes it, while the FFN hidden units (fc
        # outputs / proj inputs) and the heads (qkv outputs / proj inputs) stay prunable.
        ignored += [model.head.out, model.embedding.tok, model.embedding.pos]
        # heads to remove per layer, keeping at least one
        n_remove = min(math.ceil(ratio * model.n_head - 1e-9), model.n_head - 1) if prune_heads else 0
        for block in model.blocks:
            ignored += [block.attn.proj, block.mlp.proj]
            if n_remove == 0:  # else qkv rows would be pruned one by one, breaking head_dim
                ignored.append(block.attn.qkv)
        if n_remove > 0:
            # Torch-Pruning removes ceil(head_ratio * n_head) heads per layer: ask for the
            # count we want with a ratio just below it
            head_ratio = (n_remove - 0.5) / model.n_head
            num_heads = {block.attn.qkv: model.n_head for block in model.blocks}

    was_training = model.training
    model.eval()
    try:
        pruner = tp.pruner.BasePruner(
            model,
            example_input,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio,
            global_pruning=False,
            ignored_layers=ignored,
            num_heads=num_heads,
            prune_num_heads=bool(num_heads),
            prune_head_dims=False,  # keep head_dim: heads are removed whole
            head_pruning_ratio=head_ratio,
        )
        pruner.step()
    finally:
        model.train(was_training)

    if isinstance(model, GPT):
        for block in model.blocks:  # Torch-Pruning changes weights, not attributes
            block.attn.n_head = block.attn.qkv.out_features // (3 * block.attn.head_dim)
    new_arch = _pruned_arch(model)
    _check_rebuild(model, new_arch, from_arch)
    _sync_attributes(model, new_arch)  # the pruned object's own arch() and FLOPs follow its shapes
    return model, new_arch


def _uniform(values: list[int], what: str) -> int:
    if len(set(values)) != 1:
        raise ValueError(f"structured pruning left non-uniform {what} {values}; not expressible in the arch")
    return values[0]


def _pruned_arch(model: nn.Module) -> dict[str, Any]:
    """The arch dict of a pruned model, read off its layer shapes."""
    from bigopt.models import CNN, GPT, MLP
    from bigopt.models.cnn import DenseBlock, ResidualBlock

    arch = model.arch()
    if isinstance(model, MLP):
        arch["hidden"] = [next(m for m in group if isinstance(m, nn.Linear)).out_features
                          for group in list(model.stack)[:-1]]
    elif isinstance(model, CNN):
        arch["stem_channels"] = model.stem[0].out_channels
        for block, module in zip(arch["blocks"], model.body, strict=True):
            if isinstance(module, ResidualBlock):
                block["channels"] = module.body[3].out_channels
                width = module.body[0].out_channels
                block.pop("width", None)
                if width != block["channels"]:
                    block["width"] = width
            elif isinstance(module, DenseBlock):
                block["growth"] = _uniform([layer[2].out_channels for layer in module.layers], "dense growth")
            else:  # transition: BN, ReLU, conv1x1, pool
                block["channels"] = module[2].out_channels
    elif isinstance(model, GPT):
        d_ff = _uniform([b.mlp.fc.out_features for b in model.blocks], "d_ff")
        n_head = _uniform([b.attn.n_head for b in model.blocks], "n_head")
        arch.update(n_head=n_head, d_ff=d_ff, head_dim=model.head_dim)
        if d_ff == 4 * arch["d_model"]:
            del arch["d_ff"]
        if arch["d_model"] % n_head == 0 and model.head_dim == arch["d_model"] // n_head:
            del arch["head_dim"]
    return arch


def _check_rebuild(model: nn.Module, arch: dict[str, Any], from_arch: Any) -> None:
    """``from_arch(arch)`` must have the pruned model's state-dict names and shapes."""
    with torch.device("meta"):  # no memory, no init cost
        try:
            twin = from_arch(arch)
        except ValueError as err:
            raise ValueError(f"the pruned model is not expressible as an arch ({err}); "
                             "try a smaller pruning ratio") from err
    got = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise ValueError(
            "the pruned model does not match its rebuilt arch at "
            + ", ".join(f"{k} (pruned {want.get(k)}, rebuilt {got.get(k)})" for k in diff[:5])
            + "; this ratio makes a block's input and output widths coincide or vanish; "
            "try another pruning ratio"
        )


def _sync_attributes(model: nn.Module, arch: dict[str, Any]) -> None:
    """Make the pruned object's ``arch()`` and cached FLOPs agree with its new shapes."""
    from bigopt.models import CNN, GPT, MLP

    if isinstance(model, MLP):
        model.hidden = tuple(arch["hidden"])
    elif isinstance(model, CNN):
        model.stem_channels = arch["stem_channels"]
        model.blocks_config = copy.deepcopy(arch["blocks"])
    elif isinstance(model, GPT):
        model.n_head = arch["n_head"]
        model.d_ff = arch.get("d_ff", 4 * model.d_model)
        model.head_dim = arch.get("head_dim", model.d_model // model.n_head)
    if hasattr(model, "_flops"):
        model._flops = None
