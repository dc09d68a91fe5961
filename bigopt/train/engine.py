"""Engines: the object the loop drives. DeepSpeed's own engine, or a DDP adapter with its API.

The loop speaks DeepSpeed's engine interface (``engine(x)``, ``backward``, ``step``,
``train_batch`` for pipelines, ``save_checkpoint``/``load_checkpoint``, ``get_lr``). ``DDPEngine``
implements the same calls on plain PyTorch DDP so the baseline runs through the *same* loop.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from bigopt.models.base import full_shape
from bigopt.spec import ScheduleSpec, TrainSpec


def lr_lambda(schedule: ScheduleSpec, max_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``s``: linear warmup, then decay."""

    def factor(s: int) -> float:
        if s < schedule.warmup_steps:
            return (s + 1) / (schedule.warmup_steps + 1)
        if schedule.kind == "constant":
            return 1.0
        progress = min(1.0, (s - schedule.warmup_steps) / max(1, max_steps - schedule.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule.kind == "cosine" else 1 - progress
        return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * decay

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases and norm gains are not decayed (as in nanoGPT/GPT-2)."""
    # full_shape: a ZeRO-3 partitioned matrix is a 1-d shard (dim() == 1) but still a matrix
    decay = [p for p in model.parameters() if p.requires_grad and len(full_shape(p)) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and len(full_shape(p)) < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class DDPEngine:
    """Plain PyTorch DDP + AdamW behind DeepSpeed's engine API (the baseline strategy)."""

    def __init__(self, model: nn.Module, train: TrainSpec, precision: str, device: torch.device):
        from torch.nn.parallel import DistributedDataParallel

        self.module = model.to(device)
        use_ddp = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        self.model = DistributedDataParallel(self.module) if use_ddp else self.module
        groups = param_groups(model, train.weight_decay)
        self.optimizer = (
            torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
            if train.optimizer == "sgd"
            # fused: one kernel for all parameters on CUDA (measured on an H200, BENCHMARKS.md 2)
            else torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, eps=1e-8,
                                   **({"fused": True} if device.type == "cuda" else {})))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(train.schedule, train.max_steps))
        self.grad_accum, self.clip_grad, self.device = train.grad_accum, train.clip_grad, device
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
        self.micro_steps = 0

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Gradient all-reduce only on the boundary micro-step, as DDP users do with no_sync();
        # DeepSpeed makes the same choice internally. (no_sync() sets exactly this flag.)
        if self.model is not self.module:
            self.model.require_backward_grad_sync = self.is_gradient_accumulation_boundary()
        amp = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype else contextlib.nullcontext())
        with amp:
            return self.model(x)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        if self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def eval(self) -> None:
        self.module.eval()

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def save_checkpoint(self, directory: str) -> None:
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps},
                       os.path.join(directory, "ddp_state.pt"))

    def load_checkpoint(self, directory: str) -> None:
        # Our own checkpoint format (tensors and plain containers): safe with weights_only.
        path = os.path.join(directory, "ddp_state.pt")
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = state["micro_steps"]


class DeepSpeedCheckpointing:
    """Adapts DeepSpeed's tag-based checkpoint API to 'one directory per checkpoint'."""

    TAG = "state"

    def __init__(self, engine: Any):
        self.engine = engine

    def save_checkpoint(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag=self.TAG)

    def load_checkpoint(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag=self.TAG)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")


def build_deepspeed_engine(model: nn.Module, loss_fn: Callable, ds_config: dict[str, Any],
                           train: TrainSpec, *, pp_stages: int, partition: str) -> Any:
    """deepspeed.initialize for a plain or (pp_stages > 1) pipelined model."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    from bigopt.train.ops import prepare_ops

    prepare_ops(ds_config)  # built by the driver already, unless the lock it left is stale
    if pp_stages > 1:
        model = PipelineModule(layers=model.layers(), loss_fn=loss_fn, num_stages=pp_stages,
                               partition_method=partition)
        # DeepSpeed's gradient-norm code (clipping) counts a parameter only on model-parallel
        # rank 0 unless it is flagged model-parallel: right for Megatron's replicated
        # non-tensor-parallel params, wrong for pipeline stages, whose params are disjoint.
        # Unflagged, stage >0 gradients are left out of the global norm and clipping differs
        # from data parallel (caught by tests/train/test_strategies.py).
        for param in model.parameters():
            param.model_parallel = True
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, train.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(train.schedule, train.max_steps)),
    )
    return engine


def model_init_context(ds_config: dict[str, Any] | None) -> contextlib.AbstractContextManager:
    """The context to build the model in: ``deepspeed.zero.Init`` for ZeRO-3, else a no-op.

    ``with model_init_context(ds_config): model = build_model(...)``, then
    ``build_deepspeed_engine`` as usual. Without it ZeRO-3 still shards the model, but only
    inside ``deepspeed.initialize``: until then every rank holds the whole fp32 model, so the
    largest model that fits is bounded by one rank's memory instead of all of them together.
    Under ``zero.Init`` each parameter is partitioned across the ranks as soon as the layer
    owning it is built, so no rank ever holds the full model. Construction is then a
    collective (all ranks build the same model together) and parameters are created in the
    config's training dtype on the accelerator; the models in ``bigopt.models`` replay their
    initialization so that the weights stay bit-identical to a plain build with the same seed
    (``LayeredModel._finish_init``). Enter it after ``deepspeed.init_distributed`` (zero.Init
    also reads ``LOCAL_RANK``) and call ``flops_per_sample()`` after leaving it. Every other ZeRO
    stage keeps full parameters on each rank, so nothing changes there.
    """
    stage = ((ds_config or {}).get("zero_optimization") or {}).get("stage", 0)
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)
