"""Schedules and the DDP engine's accumulation, on CPU without Ray."""

from __future__ import annotations

import torch

from bigopt.models import MLP
from bigopt.spec import ScheduleSpec, TrainSpec
from bigopt.train.engine import DDPEngine, lr_lambda


def test_warmup_then_cosine_to_min_ratio():
    f = lr_lambda(ScheduleSpec(kind="cosine", warmup_steps=10, min_lr_ratio=0.1), max_steps=110)
    assert f(0) < f(5) < f(9) < 1.0
    assert abs(f(10) - 1.0) < 1e-9
    assert abs(f(60) - 0.55) < 1e-9  # half-way down the cosine
    assert abs(f(110) - 0.1) < 1e-9 and abs(f(500) - 0.1) < 1e-9


def test_linear_and_constant():
    lin = lr_lambda(ScheduleSpec(kind="linear", warmup_steps=0, min_lr_ratio=0.0), max_steps=100)
    assert abs(lin(50) - 0.5) < 1e-9
    const = lr_lambda(ScheduleSpec(kind="constant", warmup_steps=0), max_steps=100)
    assert const(0) == const(99) == 1.0


def _engine(grad_accum: int) -> DDPEngine:
    torch.manual_seed(0)
    model = MLP(in_features=8, hidden=(16,), num_classes=3)
    train = TrainSpec(grad_accum=grad_accum, lr=1e-2, clip_grad=0.5,
                      schedule=ScheduleSpec(kind="constant", warmup_steps=0))
    return DDPEngine(model, train, "fp32", torch.device("cpu"))


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(1)
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    big, small = _engine(1), _engine(2)
    big.backward(MLP.loss(big(x), y))
    big.step()
    for part in (slice(0, 4), slice(4, 8)):
        small.backward(MLP.loss(small(x[part]), y[part]))
        small.step()
    for a, b in zip(big.module.parameters(), small.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert small.optimizer.state  # it did step
