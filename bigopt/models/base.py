"""The contract every bigopt model follows, and the helpers the models share.

Every model is a plain sequence of layers, each taking ONE tensor and returning ONE tensor,
and ``forward`` is nothing but those layers applied in order. That is the shape DeepSpeed's
``PipelineModule(layers=model.layers(), loss_fn=Model.loss, num_stages=k)`` needs to split a
model into pipeline stages, so the same model object serves data-parallel, ZeRO and pipeline
runs without a second definition. Like nanoGPT's ``model.py``, this package imports only
torch and the standard library.
"""

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Device = torch.device | str | None


class LayeredModel(nn.Module):
    """Base class: a model that is exactly ``layers()`` applied in sequence."""

    #: Name used by ``bigopt.models.build_model`` and in ``arch()["kind"]``.
    kind: ClassVar[str] = ""

    def layers(self) -> list[nn.Module]:
        """The layers, in order; a pipeline engine may cut between any two of them."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        # Deliberately nothing but the layer sequence: anything done here and not in a layer
        # would be silently skipped when PipelineModule runs the layers itself.
        for layer in self.layers():
            x = layer(x)
        return x

    @staticmethod
    def loss(output: Tensor, target: Tensor) -> Tensor:
        """Mean cross entropy over every prediction.

        A staticmethod so ``PipelineModule(loss_fn=GPT.loss)`` can call it as a plain function
        on the last stage. Works for logits ``[B, V]`` vs ``[B]`` and ``[B, T, V]`` vs ``[B, T]``
        by flattening all leading dimensions.
        """
        return F.cross_entropy(output.reshape(-1, output.size(-1)), target.reshape(-1))

    def num_params(self) -> int:
        """Total number of parameters (shared ones counted once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) for one sample; used for MFU and cost models."""
        raise NotImplementedError

    def example_input(self, batch_size: int, *, device: Device = None) -> tuple[Tensor, Tensor]:
        """A random ``(input, target)`` batch of the right shape and dtype, for tests/benchmarks."""
        raise NotImplementedError

    def arch(self) -> dict[str, Any]:
        """``{"kind": ..., **constructor kwargs}`` with JSON-friendly values.

        ``bigopt.models.from_arch(model.arch())`` rebuilds the same architecture, which is what
        an architecture-search stage stores per trial.
        """
        raise NotImplementedError

    def _param_device(self) -> torch.device:
        return next(self.parameters()).device


def check_config_keys(cls: type, config: Mapping[str, Any], *, what: str) -> None:
    """Raise ValueError naming every key of ``config`` that ``cls.__init__`` does not accept.

    Done up front so a typo in a YAML spec reads as a config error, not as a TypeError from
    deep inside a Ray worker.
    """
    allowed = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown config key(s) for {what}: {', '.join(map(repr, unknown))}; "
            f"allowed keys are: {', '.join(allowed)}"
        )


def require_positive_int(name: str, value: Any) -> int:
    """Validate a size-like hyperparameter with a message that names it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def require_dropout(value: Any) -> float:
    """Validate a dropout probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {value!r}")
    return float(value)


def count_forward_flops(model: nn.Module, x: Tensor) -> float:
    """Forward FLOPs of ``model(x)`` per sample: 2 x multiply-adds of every Conv2d and Linear.

    Measured with forward hooks on one dummy batch rather than derived by hand, so it stays
    right for any block list an architecture search produces. Norms, activations, pooling and
    bias adds are ignored, as in the usual MFU convention. The caller passes a batch of one.
    """
    macs = 0

    def hook(module: nn.Module, _inputs: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            k_h, k_w = module.kernel_size
            macs += out.numel() * (module.in_channels // module.groups) * k_h * k_w
        elif isinstance(module, nn.Linear):
            macs += out.numel() * module.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    was_training = model.training
    try:
        # eval() so BatchNorm running statistics are not touched by the dummy batch
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return 2.0 * macs / x.shape[0]
