"""Where compression plugs into training, without the loop knowing about pruning or QAT.

Three kinds of hook, after torchtitan's model converters:

* ``model_transforms``: ``transform(model) -> model``, applied once the model is built and
  before the engine (DeepSpeed or DDP) wraps it: QAT fake-quant modules, pruning masks.
  Under ZeRO-3 the model is already partitioned (``deepspeed.zero.Init``), so a transform
  that reads weights must gather them (``deepspeed.zero.GatheredParameters``).
* ``teacher`` + ``loss_builder``: ``teacher()`` builds a frozen model on the worker (a
  factory, so the teacher is never pickled with its weights); ``loss_builder(base_loss)``
  returns ``loss(output, target, teacher_output)``: distillation's soft targets.
* ``step_callbacks``: ``callback(model, step)`` after each optimizer step: re-apply pruning
  masks, sparsity schedules. A callback may also have ``metrics() -> dict`` (merged into each
  logged metrics row) and ``finalize_state(state) -> state`` (applied to the consolidated
  weights before ``model.safetensors`` is written: the final pruning masks, which the fp32
  master weights of a mixed-precision engine do not carry).
* ``regularizers``: ``regularizer(model) -> scalar tensor`` added to the loss (L1 sparsity).

Hooks travel to Ray Train workers by (cloud)pickle, so they are plain functions or small
objects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ModelTransform = Callable[[Any], Any]
StepCallback = Callable[[Any, int], None]
LossFn = Callable[[Any, Any], Any]
TeacherLossFn = Callable[[Any, Any, Any], Any]


@dataclass(frozen=True)
class TrainHooks:
    model_transforms: tuple[ModelTransform, ...] = ()
    step_callbacks: tuple[StepCallback, ...] = ()
    teacher: Callable[[], Any] | None = None
    loss_builder: Callable[[LossFn], TeacherLossFn] | None = None
    regularizers: tuple[Callable[[Any], Any], ...] = ()

    def callback_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for callback in self.step_callbacks:
            out.update(getattr(callback, "metrics", dict)())
        return out

    def finalize_state(self, state: dict[str, Any]) -> dict[str, Any]:
        for callback in self.step_callbacks:
            finalize = getattr(callback, "finalize_state", None)
            if finalize is not None:
                state = finalize(state)
        return state

    def __post_init__(self) -> None:
        if (self.teacher is None) != (self.loss_builder is None):
            raise ValueError("TrainHooks: a teacher needs a loss_builder that uses its output, "
                             "and a loss_builder needs a teacher")
