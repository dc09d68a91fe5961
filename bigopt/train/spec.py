"""The ``train`` section: strategy, ZeRO, pipeline, precision, optimizer, schedule,
checkpoints; and its rules (``TrainSpec.problems``, ``layout_problems``). Lives beside the train
stage; ``bigopt.spec`` re-exports it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from bigopt.sections import Section

if TYPE_CHECKING:
    from bigopt.spec import JobSpec

class ZeroSpec(Section):
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = Field(False, description="Optimizer state in CPU RAM (ZeRO>=1).")
    offload_params: bool = Field(False, description="Parameters in CPU RAM (ZeRO-3 only).")


class PipelineSpec(Section):
    stages: int = Field(1, ge=1, description="Pipeline stages; workers / stages = data ranks.")
    micro_batches: int = Field(4, ge=1, description="Micro-batches per step in the pipeline.")
    partition: str = Field(
        "parameters", description="DeepSpeed partition_method: parameters | uniform | type:REGEX"
    )


class FP16Spec(Section):
    """DeepSpeed's dynamic loss scaler (fp16 only)."""

    loss_scale: float = Field(0, ge=0, description="0: dynamic; >0: a fixed scale.")
    initial_scale_power: int = Field(16, ge=0, le=32)
    loss_scale_window: int = Field(1000, ge=1)
    hysteresis: int = Field(
        2, ge=1, description="Overflows before the scale halves (ZeRO 1-3; DeepSpeed's ZeRO-0 "
        "fp16 optimizer halves on every overflow).")
    min_loss_scale: float = Field(1, gt=0)


class ScheduleSpec(Section):
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of lr.")


DEFAULT_MAX_FAILURES = 3


class TrainSpec(Section):
    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    zero: ZeroSpec = Field(default_factory=ZeroSpec)
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "auto", description="auto: fp16 on GPUs, bf16 on CPUs (DeepSpeed refuses fp16 there)."
    )
    fp16: FP16Spec = Field(default_factory=FP16Spec)
    activation_checkpointing: bool = False
    batch_size: int = Field(16, ge=1, description="Micro-batch per data-parallel worker.")
    data_order: Literal["auto", "streaming", "deterministic"] = Field(
        "auto",
        description="deterministic: one order fixed by the seed (row groups permuted per epoch, "
        "each data-parallel rank reading only its contiguous share of them through a local "
        "shuffle buffer; so the rows in a step depend on the data-parallel degree): the same "
        "spec, seed and degree "
        "give the same loss curve, a resume skips exactly the batches already seen, and "
        "pipeline stages see identical batches. streaming: Ray's streaming_split, rows reach "
        "whichever worker asks first (not reproducible). auto: deterministic.",
    )
    shuffle_buffer: int = Field(
        1024, ge=0, description="Rows in the local shuffle buffer, reseeded per epoch; with the "
        "deterministic order the row groups are permuted per epoch too. 0: read in shard order.")
    node_cache_gb: float = Field(
        20, ge=0, description="s3:// training shards are cached whole on each node's disk "
        "(BIGOPT_NODE_CACHE, default ~/.cache/bigopt/shards; least recently used evicted past "
        "this size; checked by SHA-256), so later epochs and runs read locally. 0: read S3 "
        "each time.")
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(300, ge=1)
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw for transformers; sgd (with momentum) for CNNs, and for "
        "strategy-equivalence checks, where Adam's g/|g| would amplify rounding noise.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    lr: float = Field(3.0e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    clip_grad: float = Field(1.0, ge=0, description="0 disables clipping.")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=0, description="0: evaluate only at the start and the end.")
    eval_batches: int = Field(8, ge=1, description="Validation batches per worker per eval.")
    checkpoint_every: int = Field(100, ge=0, description="0: checkpoint only at the end.")
    checkpoint_at: list[int] = Field(
        default_factory=list,
        description="Extra steps to checkpoint, e.g. [1] to inspect the first update "
        "(torchtitan's first-step checkpoint).",
    )
    keep_last: int = Field(2, ge=1)
    max_failures: int | None = Field(
        None, ge=0, description="Worker-group restarts Ray Train may do after a failure. null: "
        f"{DEFAULT_MAX_FAILURES} when checkpoint_every > 0 (a restart resumes from the newest "
        "checkpoint, repeating at most one interval), else 0 (a restart would start over).")
    seed: int = 0

    def problems(self, spec: JobSpec) -> list[tuple[str, str]]:
        return train_problems(spec)


def layout_problems(world_size: int, pp_stages: int, zero_stage: int) -> list[tuple[str, str]]:
    """The parallel-layout rules, in one place (``Layout`` raises on the same ones)."""
    problems = []
    if world_size % pp_stages:
        problems.append(("train.pipeline.stages",
                         f"{pp_stages} must divide cluster.num_workers={world_size}"))
    if pp_stages > 1 and zero_stage > 1:
        problems.append(("train.zero.stage", f"{zero_stage} cannot combine with pipeline stages>1 "
                         "(DeepSpeed's pipeline engine supports ZeRO 0 and 1); use 0 or 1"))
    return problems


def train_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """The train section's rules, with the cluster it runs on and the model it trains."""
    problems: list[tuple[str, str]] = []
    train, model, cluster = spec.train, spec.model, spec.cluster
    if train is None:
        return problems
    if model is None:
        problems.append(("model", "the train stage needs a model section"))
    pp = train.pipeline.stages
    if train.strategy == "ddp":
        if pp > 1:
            problems.append(("train.pipeline.stages", "pipeline needs strategy: deepspeed"))
        if train.zero.offload_optimizer or train.zero.offload_params:
            problems.append(("train.zero", "offload needs strategy: deepspeed"))
        if train.precision == "fp16":
            problems.append(("train.precision", "fp16 loss scaling needs strategy: deepspeed"))
    zero_stage = train.zero.stage if train.strategy == "deepspeed" else 0
    problems += layout_problems(cluster.num_workers, pp, zero_stage)
    if train.strategy == "deepspeed":
        if train.zero.offload_optimizer and train.zero.stage == 0:
            problems.append(("train.zero.offload_optimizer", "needs zero.stage >= 1"))
        if train.zero.offload_params and train.zero.stage != 3:
            problems.append(("train.zero.offload_params", "needs zero.stage: 3"))
    if train.precision == "fp16" and cluster.gpus_per_worker == 0:
        problems.append(
            ("train.precision", "fp16 needs GPUs (DeepSpeed refuses it on CPU); use auto or bf16")
        )
    if pp > 1 and train.data_order == "streaming":
        problems.append(("train.data_order", "pipeline stages need identical batches: use "
                         "deterministic or auto"))
    if pp > 1 and train.activation_checkpointing:
        problems.append(("train.activation_checkpointing", "not supported with pipeline yet"))
    return problems


