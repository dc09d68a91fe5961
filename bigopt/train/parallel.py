"""Parallelism as small transforms chosen by the spec.

``Layout`` says how the world is cut (pipeline stages x data-parallel ranks, ZeRO stage) and
checks itself. ``build_deepspeed_config`` is the only place a DeepSpeed config dict is made: it
applies one small transform per spec section, in a commented order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from bigopt.spec import FP16Spec, JobSpec, PipelineSpec, TrainSpec, ZeroSpec, layout_problems

log = logging.getLogger("bigopt")


@dataclass(frozen=True)
class Layout:
    """How ``world_size`` ranks are arranged: ``pp_stages`` pipeline stages x ``dp`` replicas."""

    world_size: int
    pp_stages: int = 1
    zero_stage: int = 0

    def __post_init__(self) -> None:
        problems = layout_problems(self.world_size, self.pp_stages, self.zero_stage)
        if problems:
            raise ValueError("; ".join(f"{path}: {msg}" for path, msg in problems))

    @property
    def dp(self) -> int:
        return self.world_size // self.pp_stages

    @property
    def pp_enabled(self) -> bool:
        return self.pp_stages > 1

    def dp_rank(self, world_rank: int) -> int:
        """Data-parallel rank of a world rank.

        DeepSpeed's PipelineModule lays ranks out with the pipe axis outermost (its
        ProcessTopology(axes=['pipe', 'data'])), so rank = stage * dp + dp_rank.
        """
        return world_rank % self.dp


def check_precision_supported(precision: str, *, fp16_supported: bool, device: str) -> None:
    """fp16 where the accelerator refuses it is an error naming the fix, never a fallback."""
    if precision == "fp16" and not fp16_supported:
        raise ValueError(
            f"train.precision: fp16 is not supported on this device ({device}); "
            "use precision: auto (fp16 on GPUs, bf16 elsewhere) or bf16"
        )


def apply_zero(ds: dict[str, Any], zero: ZeroSpec) -> dict[str, Any]:
    cfg: dict[str, Any] = {"stage": zero.stage}
    if zero.offload_optimizer:
        cfg["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if zero.offload_params:
        cfg["offload_param"] = {"device": "cpu", "pin_memory": False}
    if zero.stage == 3:
        # Gather small parameters eagerly: at this scale the prefetch bookkeeping costs
        # more than it saves. Large models use DeepSpeed's defaults.
        cfg["stage3_param_persistence_threshold"] = 0
    return {**ds, "zero_optimization": cfg}


def apply_precision(ds: dict[str, Any], precision: str, fp16: FP16Spec) -> dict[str, Any]:
    if precision == "bf16":
        return {**ds, "bf16": {"enabled": True}}
    if precision == "fp16":
        return {
            **ds,
            "fp16": {
                "enabled": True,
                "loss_scale": fp16.loss_scale,
                "initial_scale_power": fp16.initial_scale_power,
                "loss_scale_window": fp16.loss_scale_window,
                "hysteresis": fp16.hysteresis,
                "min_loss_scale": fp16.min_loss_scale,
            },
        }
    if precision != "fp32":
        raise ValueError(f"train.precision: {precision!r} must be resolved before this point")
    return ds


def apply_pipeline(ds: dict[str, Any], pipeline: PipelineSpec, layout: Layout) -> dict[str, Any]:
    if not layout.pp_enabled:
        return ds
    # The pipeline engine consumes `gradient_accumulation_steps` micro-batches per
    # train_batch(); they are what fills the pipeline, so they are multiplied in.
    gas = ds["gradient_accumulation_steps"] * pipeline.micro_batches
    return {**ds, "gradient_accumulation_steps": gas, "pipeline": {"activation_checkpoint_interval": 0}}


def optimizer_config(train: TrainSpec) -> dict[str, Any]:
    if train.optimizer == "sgd":
        # Not a DeepSpeed-native name: DeepSpeed builds torch.optim.SGD from it.
        return {"type": "SGD", "params": {"lr": train.lr, "momentum": train.momentum,
                                          "weight_decay": train.weight_decay}}
    # torch_adam: the pure-PyTorch AdamW, so CPU runs need no compiled op and all strategies
    # (DDP included) share one optimizer implementation. Offload needs DeepSpeedCPUAdam.
    return {"type": "AdamW", "params": {"lr": train.lr, "betas": list(train.betas), "eps": 1e-8,
                                        "weight_decay": train.weight_decay,
                                        "torch_adam": not train.zero.offload_optimizer}}


def micro_batches_per_step(train: TrainSpec, layout: Layout) -> int:
    """Micro-batches each data-parallel rank consumes per optimizer step."""
    return train.grad_accum * (train.pipeline.micro_batches if layout.pp_enabled else 1)


def build_deepspeed_config(spec: JobSpec, layout: Layout, precision: str) -> dict[str, Any]:
    """The DeepSpeed config for this spec and layout (the only place one is built)."""
    train = spec.train
    assert train is not None
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.clip_grad,
        "optimizer": optimizer_config(train),
        # ZeRO shards any torch optimizer's state; DeepSpeed only asks us to say so for the
        # ones it did not write (SGD here).
        "zero_allow_untested_optimizer": train.optimizer == "sgd",
        "steps_per_print": 10**9,  # bigopt logs; DeepSpeed's own prints would duplicate it
        "wall_clock_breakdown": False,
    }
    # Order: pipeline first (it changes gradient_accumulation_steps, which DeepSpeed checks
    # against train_batch_size), then ZeRO, then precision (independent of both).
    ds = apply_pipeline(ds, train.pipeline, layout)
    ds = apply_zero(ds, train.zero)
    ds = apply_precision(ds, precision, train.fp16)
    ds["train_batch_size"] = train.batch_size * ds["gradient_accumulation_steps"] * layout.dp
    return ds
