"""``resolve(spec)``: everything derived from a spec, decided once in the driver.

The spec says what the user asked for; the resolved job says what will run: the task, the
token context (preset-aware), the model's architecture dict, the parallel layout, the data
order, the precision and the DeepSpeed config. It is written to the run dir as
``resolved.json`` and is what Ray Train workers and Tune trials receive, so no worker
re-derives a rule (and no two places can disagree about one).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from bigopt.spec import DEFAULT_MAX_FAILURES, GPTModelSpec, JobSpec, SpecError, TrainSpec
from bigopt.tasks import TASK_OF_MODEL, TASK_OF_SOURCE, get_task

log = logging.getLogger("bigopt")


class LayoutInfo(BaseModel):
    """How the training workers are arranged (``bigopt.train.parallel.Layout`` checks it)."""

    model_config = ConfigDict(frozen=True)
    world_size: int
    pp_stages: int = 1
    zero_stage: int = 0

    @property
    def dp(self) -> int:
        return self.world_size // self.pp_stages


class ResolvedJob(BaseModel):
    model_config = ConfigDict(frozen=True)

    spec: JobSpec
    stages: list[str]
    task: str
    #: tokens per training window (language models), None otherwise
    context: int | None = None
    #: ``{"kind": ..., **constructor args}``: ``bigopt.models.from_arch`` builds it
    arch: dict[str, Any] | None = None
    layout: LayoutInfo | None = None
    data_order: Literal["streaming", "deterministic"] | None = None
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    deepspeed_config: dict[str, Any] | None = None
    #: worker-group restarts Ray Train may do (``train.max_failures``, defaulted)
    max_failures: int = 0
    #: torch.distributed backend of the training workers: NCCL with GPUs, gloo on CPUs
    backend: Literal["gloo", "nccl"] = "gloo"
    #: the search's metric and direction (``auto``: the task's default), when it searches
    search_metric: str | None = None
    search_mode: Literal["min", "max"] | None = None

    @property
    def columns(self) -> tuple[str, str]:
        return get_task(self.task).columns

    def dumps(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def loads(cls, text: str) -> ResolvedJob:
        return cls.model_validate_json(text)


def _task(spec: JobSpec) -> str:
    if spec.model is not None:
        return TASK_OF_MODEL[spec.model.kind]
    if spec.data is not None:
        return TASK_OF_SOURCE[spec.data.source.kind]
    raise SpecError([("model", "a spec needs a model or a data section")])


def _arch(spec: JobSpec) -> dict[str, Any] | None:
    return model_arch(spec.model, spec.train) if spec.model is not None else None


def model_arch(m: Any, train: TrainSpec | None) -> dict[str, Any]:
    """The architecture dict of a model section (the job's, or a distillation student's)."""
    if isinstance(m, GPTModelSpec):
        cfg = m.config()
        cfg["activation_checkpointing"] = train.activation_checkpointing if train else False
    else:
        cfg = m.model_dump(exclude={"kind"})
    return {"kind": m.kind, **cfg}


def resolve_precision(precision: str, *, has_gpu: bool) -> str:
    """``auto`` -> fp16 on GPUs, bf16 elsewhere (DeepSpeed's CPU accelerator refuses fp16)."""
    if precision != "auto":
        return precision
    choice = "fp16" if has_gpu else "bf16"
    log.debug("train.precision: auto -> %s (%s)", choice, "GPU" if has_gpu else "CPU workers")
    return choice


def resolve_data_order(spec: JobSpec) -> Literal["streaming", "deterministic"]:
    """``auto``: deterministic, so the same spec and seed give the same run (pipelines need it
    too); ``streaming`` only when asked for."""
    train = spec.train
    assert train is not None
    return "streaming" if train.data_order == "streaming" else "deterministic"


def resolve_max_failures(train: TrainSpec) -> int:
    """A run that checkpoints survives a few worker failures by default (a restart resumes
    from the newest complete checkpoint); one that does not would start over, so it fails."""
    if train.max_failures is not None:
        return train.max_failures
    return DEFAULT_MAX_FAILURES if train.checkpoint_every > 0 else 0


def resolve(spec: JobSpec) -> ResolvedJob:
    """The resolved job for ``spec`` (raises SpecError naming the field on a problem)."""
    from bigopt.train.parallel import Layout, build_deepspeed_config

    task = _task(spec)
    fields: dict[str, Any] = {"spec": spec, "stages": spec.stages(), "task": task,
                              "context": spec.context if get_task(task).is_sequence else None,
                              "arch": _arch(spec)}
    if spec.search is not None:
        metric, mode = get_task(task).default_metric
        metric = metric if spec.search.metric == "auto" else spec.search.metric
        if spec.search.mode != "auto":
            mode = spec.search.mode
        elif spec.search.metric != "auto":  # a named metric: accuracies rise, losses fall
            mode = "max" if "acc" in metric else "min"
        fields.update(search_metric=metric, search_mode=mode)
    train = spec.train
    if train is not None:
        zero_stage = train.zero.stage if train.strategy == "deepspeed" else 0
        try:
            layout = Layout(spec.cluster.num_workers, train.pipeline.stages, zero_stage)
        except ValueError as exc:
            raise SpecError([("train.pipeline.stages", str(exc))]) from None
        precision = resolve_precision(train.precision, has_gpu=spec.cluster.gpus_per_worker > 0)
        if train.precision != precision:  # the spec written to the run dir says what ran
            spec = spec.model_copy(update={"train": train.model_copy(update={"precision": precision})})
        fields.update(spec=spec,
            layout=LayoutInfo(world_size=layout.world_size, pp_stages=layout.pp_stages,
                              zero_stage=layout.zero_stage),
            data_order=resolve_data_order(spec), precision=precision,
            max_failures=resolve_max_failures(train),
            backend="nccl" if spec.cluster.gpus_per_worker > 0 else "gloo",
            deepspeed_config=(build_deepspeed_config(spec, layout, precision)
                              if train.strategy == "deepspeed" else None))
    return ResolvedJob(**fields)


def resolve_after_search(job: ResolvedJob, best_config: dict[str, Any]) -> ResolvedJob:
    """The job the stages after a search run: the search's best configuration (spec paths and
    values, e.g. ``{"train.lr": 3e-4, "model": {...}}``) applied to the spec, at the spec's own
    (full) training budget, with the search section dropped."""
    from bigopt.spec import with_values

    return resolve(with_values(job.spec.model_copy(update={"search": None}), best_config))
