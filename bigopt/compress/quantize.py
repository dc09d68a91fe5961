"""int8 quantization with torchao: post-training (PTQ) and quantization-aware training (QAT).

torchao's configs quantize the weights of ``nn.Linear`` layers only: convolutions (and a
``nn.MultiheadAttention``'s output projection, and embeddings) stay in float, so a CNN mostly
keeps its float size and speed; ``quantized_layers`` says what was converted.

A quantized model's state dict holds torchao tensor subclasses, which safetensors cannot
store; ``quantized_size_bytes`` measures it with ``torch.save`` instead. Such a file must only
be read back with ``torch.load(..., weights_only=True)`` (with torchao's safe globals), never
with ``weights_only=False``.

QAT (``QATPrepare`` then ``qat_convert``) follows torchao's ``QATConfig`` flow: prepare swaps
each ``nn.Linear`` for a ``FakeQuantizedLinear`` that rounds its weights (per output channel,
symmetric int8) and its input activations (per token, asymmetric int8) in the forward pass
and passes gradients straight through; convert swaps them back and quantizes the weights
for real with the same numerics (``Int8DynamicActivationIntxWeightConfig``, the config torchao
0.18 accepts as a QAT base for int8, pytorch/ao#2992). Fake-quantized modules keep the
parameter names of the layers they replace, so a QAT checkpoint loads into a plain model.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

QuantMode = Literal["int8_dynamic", "int8_weight_only"]
#: everything ``can_run`` knows: the two PTQ modes and int8 QAT
Mode = Literal["int8_dynamic", "int8_weight_only", "qat_int8"]
MODES: tuple[str, ...] = get_args(Mode)


def _ptq_config(mode: str) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if mode == "int8_dynamic":
        # weights int8 per channel; activations quantized to int8 per token at run time
        return Int8DynamicActivationInt8WeightConfig()
    if mode == "int8_weight_only":
        # weights int8 per channel, dequantized in the matmul: memory-bound layers gain most
        return Int8WeightOnlyConfig()
    raise ValueError(f"unknown quantization mode {mode!r}; expected one of: {', '.join(get_args(QuantMode))}")


def _qat_base_config(group_size: int | None) -> Any:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup

    granularity = PerAxis(0) if group_size is None else PerGroup(group_size)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=granularity)


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose weight is quantized (a torchao tensor) or fake-quantized."""
    from torchao.quantization.qat import FakeQuantizedLinear
    from torchao.utils import TorchAOBaseTensor

    return [name for name, m in model.named_modules()
            if isinstance(m, FakeQuantizedLinear)
            or isinstance(getattr(m, "weight", None), TorchAOBaseTensor)]


def ptq(model: nn.Module, mode: QuantMode, *, inplace: bool = False) -> nn.Module:
    """Post-training int8 quantization of every ``nn.Linear`` (eval mode), via ``quantize_``.

    Returns the quantized model: a copy unless ``inplace`` (the float model usually still has
    to be evaluated beside it). Raises ValueError when the model has no layer to quantize.
    """
    config = _ptq_config(mode)
    if not _linears(model):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer for torchao to quantize")
    from torchao.quantization import quantize_

    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    quantize_(model, config)
    return model


@dataclass(frozen=True)
class QATPrepare:
    """``model_transforms`` hook: insert int8 fake quantization into every ``nn.Linear``.

    ``group_size`` None quantizes weights per output channel; an int quantizes them in groups
    of that many input features (every Linear's ``in_features`` must be a multiple). Use the
    same value for ``qat_convert``.
    """

    group_size: int | None = None

    def __call__(self, model: nn.Module) -> nn.Module:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        reason = _linear_problem(model, self.group_size)
        if reason:
            raise ValueError(reason)
        quantize_(model, QATConfig(_qat_base_config(self.group_size), step="prepare"))
        return model


def qat_convert(model: nn.Module, *, group_size: int | None = None, inplace: bool = True) -> nn.Module:
    """Turn a ``QATPrepare``-d model into the real int8 model (same numerics as the fake quant).

    In place by default (the fake-quantized model is rarely needed afterwards). The result's
    int8 weights are torchao ``IntxUnpackedToInt8Tensor``s: the reference form that ExecuTorch
    (XNNPACK) lowers to int8 kernels; run in eager PyTorch they are dequantized per matmul.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    if not quantized_layers(model):
        raise ValueError("qat_convert: the model has no fake-quantized layer; apply QATPrepare first")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    quantize_(model, QATConfig(_qat_base_config(group_size), step="convert"))
    return model


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    from torchao.quantization.quant_api import _is_linear  # torchao's own filter for quantize_

    return [(name, m) for name, m in model.named_modules() if _is_linear(m)]


def _linear_problem(model: nn.Module, group_size: int | None) -> str | None:
    linears = _linears(model)
    if not linears:
        return f"{type(model).__name__} has no nn.Linear layer for torchao to quantize"
    if group_size is not None:
        bad = [name for name, m in linears if m.in_features % group_size]
        if bad:
            return (f"group_size={group_size} does not divide the input features of "
                    f"{', '.join(bad[:5])}; use per-channel (group_size None)")
    return None


def can_run(mode: str, model: nn.Module, *, group_size: int | None = None) -> str | None:
    """Why ``mode`` cannot quantize ``model`` here, or None when it can.

    For a validator to fail early rather than after training: checks the mode, that the model
    has a Linear layer torchao would quantize, and then runs the mode for real on a small
    Linear on the model's device and dtype (torchao import, kernels for that device).
    """
    if mode not in MODES:
        return f"unknown quantization mode {mode!r}; expected one of: {', '.join(MODES)}"
    reason = _linear_problem(model, group_size if mode == "qat_int8" else None)
    if reason:
        return reason
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    width = group_size or 64
    try:
        probe = nn.Sequential(nn.Linear(width, width)).to(device=device, dtype=dtype)
        x = torch.randn(4, width, device=device, dtype=dtype)
        if mode == "qat_int8":
            QATPrepare(group_size)(probe)
            probe(x).sum().backward()
            qat_convert(probe, group_size=group_size)
        else:
            probe = ptq(probe, mode, inplace=True)  # type: ignore[arg-type]
        with torch.inference_mode():
            probe(x)
    except Exception as err:  # any failure means "not here"; the message says which
        return f"torchao {mode} does not run on {device} ({dtype}): {type(err).__name__}: {err}"
    return None


def quantized_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size of a (quantized) checkpoint.

    Written to a temporary file and measured, never loaded back. Works for float models too,
    so float and int8 sizes are measured the same way.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        torch.save(model.state_dict(), path)
        return os.path.getsize(path)
