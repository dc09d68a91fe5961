"""Compression as training hooks (``bigopt.train.hooks.TrainHooks``): small picklable objects
shipped to every Ray Train worker, which work on a plain module, under DDP and under any ZeRO
stage (ZeRO-3 partitions parameters: these gather them, edit them, and let rank 0's edit be
partitioned back).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from bigopt.compress.prune import MaskCallback, apply_masks, prunable_weights


def _partitioned(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


@contextlib.contextmanager
def gathered(model: nn.Module, *, modify: bool) -> Iterator[None]:
    """Full parameters inside the block on every rank (ZeRO-3); with ``modify``, rank 0's
    edits are partitioned back on exit (every rank makes the same edit here)."""
    params = _partitioned(model)
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


@dataclass(frozen=True)
class LoadWeights:
    """Model transform: load ``model.safetensors`` (a URI, local or S3) into the freshly built
    model: a fine-tuning step starts from the previous step's weights."""

    weights: str

    def __call__(self, model: nn.Module) -> nn.Module:
        from bigopt.load import load_state, load_weights_into

        state = load_state(self.weights)
        with gathered(model, modify=True), torch.no_grad():
            load_weights_into(model, state, source=self.weights)
        return model


@dataclass(frozen=True)
class Teacher:
    """Teacher factory: the frozen model of a model artifact, built on each worker (its
    weights are read there, never pickled into the hook)."""

    arch: dict[str, Any]
    weights: str

    def __call__(self) -> nn.Module:
        from bigopt.load import load_state, load_weights_into
        from bigopt.models import from_arch

        model = from_arch(self.arch).float()
        load_weights_into(model, load_state(self.weights), source=self.weights)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()


@dataclass
class PruneMasks:
    """Step callback: gradual magnitude pruning (``MaskCallback``: Zhu & Gupta's cubic
    schedule, masks re-applied after every optimizer step) under any engine, with what the
    report and the tests need to see it work:

    * ``metrics()``: the target sparsity, the sparsity the forward pass sees after the masks
      are re-applied, and ``regrown``: masked weights the optimizer had moved off zero since
      the last step (Adam's momentum, the fp32 masters of bf16 engines): the reason masks are
      re-applied at all;
    * ``finalize_state(state)``: the final masks applied to the consolidated fp32 weights
      (a mixed-precision engine keeps its masters dense; the forward pass never saw them).
    """

    inner: MaskCallback
    last: dict[str, float] = field(default_factory=dict)

    def __call__(self, model: nn.Module, step: int) -> None:
        with gathered(model, modify=True), torch.no_grad():
            regrown = 0
            if self.inner.masks is not None and step >= self.inner.start:
                weights = prunable_weights(model)
                regrown = sum(int((weights[n].detach() != 0)[~m.bool()].sum())
                              for n, m in self.inner.masks.items() if n in weights)
            self.inner(model, step)
            if self.inner.masks is None:
                return
            weights = prunable_weights(model)
            total = sum(w.numel() for w in weights.values())
            zeros = sum(int((w.detach() == 0).sum()) for w in weights.values())
        self.last = {"sparsity_target": float(self.inner.sparsity),
                     "sparsity_forward": zeros / max(total, 1), "regrown": float(regrown)}

    def metrics(self) -> dict[str, float]:
        return dict(self.last)

    def finalize_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        masks = self.inner.masks
        if not masks:
            return state
        out = dict(state)
        for name, mask in masks.items():
            if name in out:
                out[name] = out[name] * mask.to(device=out[name].device, dtype=out[name].dtype)
        return out


@dataclass
class KeepZeros:
    """Step callback for fine-tuning an already pruned model (QAT after magnitude pruning):
    the weights that are zero when training starts stay zero (re-applied after every step,
    and on the saved weights), so a later step does not undo an earlier one's sparsity."""

    masks: dict[str, torch.Tensor] | None = None

    def __call__(self, model: nn.Module, step: int) -> None:
        with gathered(model, modify=True), torch.no_grad():
            weights = prunable_weights(model)
            if self.masks is None:  # set by KeepZerosFrom from the starting weights
                raise RuntimeError("KeepZeros needs KeepZerosFrom among the model transforms")
            apply_masks(model, {n: m for n, m in self.masks.items() if n in weights})

    def finalize_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.masks:
            return state
        return {k: v * self.masks[k].to(v.dtype) if k in self.masks else v for k, v in state.items()}


@dataclass(frozen=True)
class KeepZerosFrom:
    """Model transform that records the zero pattern of the starting weights into a
    ``KeepZeros`` callback (the same object travels in the hooks, so both see it)."""

    keeper: KeepZeros

    def __call__(self, model: nn.Module) -> nn.Module:
        with gathered(model, modify=False), torch.no_grad():
            self.keeper.masks = {n: (w.detach() != 0).cpu() for n, w in prunable_weights(model).items()}
        return model


@dataclass(frozen=True)
class L1Penalty:
    """Regularizer: ``weight * sum |w|`` over the prunable weights (not under ZeRO-3, whose
    parameters are shards outside the forward pass: the spec refuses that pairing)."""

    weight: float

    def __call__(self, model: nn.Module) -> torch.Tensor:
        weights = prunable_weights(model)
        return self.weight * sum(w.float().abs().sum() for w in weights.values())


__all__ = ["L1Penalty", "LoadWeights", "PruneMasks", "Teacher", "apply_masks", "gathered"]
