"""What a compression step is judged by: parameters, bytes on disk, CPU latency, quality.

Quality helpers take any iterable of ``(x, y)`` tensor batches and move them to the model's
device; they run in eval mode under ``torch.inference_mode`` and put the mode back.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigopt.models.base import full_numel
from bigopt.tasks import IGNORE_INDEX


def param_count(model: nn.Module) -> int:
    """Number of parameters, shared ones once; full sizes also for ZeRO-3 partitioned ones.

    A torchao-quantized weight counts its logical elements (one per original weight).
    """
    return sum(full_numel(p) for p in model.parameters())


def size_bytes_safetensors(model: nn.Module) -> int:
    """Bytes of ``model.state_dict()`` as a ``.safetensors`` file (what ``model.safetensors``
    takes on disk). Quantized (torchao tensor-subclass) state dicts cannot be stored so: use
    ``bigopt.compress.quantize.quantized_size_bytes`` for them."""
    from bigopt.load import safetensors_bytes

    return len(safetensors_bytes(model.state_dict()))


@contextmanager
def _eval_inference(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def cpu_latency_ms(
    model: nn.Module, x: Tensor, *, repeats: int = 30, warmup: int = 5, threads: int | None = 1
) -> dict[str, float]:
    """Median and 90th-percentile wall time of ``model(x)`` on the CPU, in milliseconds.

    ``threads=1`` by default: single-thread latency is what an edge device or a busy server
    core sees, and it is far less noisy on a shared machine than a multi-threaded run. The
    previous ``torch.get_num_threads()`` is restored afterwards (None leaves it alone).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        x = x.cpu()
        times = []
        with _eval_inference(model):
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                model(x)
                if i >= warmup:
                    times.append(1000.0 * (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(old_threads)
    times.sort()
    p90 = times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]
    return {"median": statistics.median(times), "p90": p90}


def accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Fraction of samples whose argmax logit is the label (classifier logits ``[B, C]``)."""
    device, correct, total = _device(model), 0, 0
    with _eval_inference(model):
        for x, y in batches:
            y = y.to(device)
            correct += int((model(x.to(device)).argmax(-1) == y).sum())
            total += y.numel()
    if total == 0:
        raise ValueError("accuracy: no samples")
    return correct / total


def perplexity(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """``exp`` of the mean token cross entropy over all batches, ignoring ``IGNORE_INDEX``."""
    device, nll, tokens = _device(model), 0.0, 0
    with _eval_inference(model):
        for x, y in batches:
            logits = model(x.to(device)).float()
            y = y.to(device).reshape(-1)
            nll += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y,
                                         ignore_index=IGNORE_INDEX, reduction="sum"))
            tokens += int((y != IGNORE_INDEX).sum())
    if tokens == 0:
        raise ValueError("perplexity: no target tokens")
    return math.exp(nll / tokens)
