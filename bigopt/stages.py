"""The stage table: one entry per stage, in the order ``bigopt run`` walks them.

Each entry names its spec section (= its name and its run-dir folder), the artifact kinds it
consumes and produces, its function and its report section. ``JobSpec.stages()``, the CLI's
stage subcommands, ``bigopt run``'s order, input resolution (``--from``) and the report's
sections are all generated from this table. Functions are named as ``module:function`` and
imported only when the stage runs, so the table itself is cheap to import (``bigopt
validate`` reads it without importing torch, Ray or DeepSpeed).

A stage function is ``run(job, inputs, out, options) -> Artifact``: the resolved job, its input
artifacts by kind, its own folder ``out`` (a ``RunDir`` view of ``<run>/<stage>/``: it names no
other stage's folder), and per-invocation options (``StageOptions``: resume, hooks, console).
A report function is ``section(out, artifact) -> lines``.

Adding a stage: its module (the function, its report section), one row here, and its spec
section beside it (``bigopt/<stage>/spec.py``, a field of ``JobSpec`` of the same name, with
its own cross-field rules in ``problems(spec)``). Nothing else names it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    #: artifact kinds the stage needs, and ones it uses when present
    consumes: tuple[str, ...]
    produces: str
    run: str
    report: str | None = None
    optional: tuple[str, ...] = ()
    #: takes ``--resume CHECKPOINT|latest`` (a stage that checkpoints)
    resumable: bool = False
    #: ``check(job, inputs) -> [(field, problem)]``: run before Ray starts, once the inputs are
    #: known (an input from another run that does not fit the spec exits 2 naming the field)
    check: str | None = None

    def function(self) -> Callable[..., Any]:
        return _load(self.run)

    def check_function(self) -> Callable[..., list[tuple[str, str]]] | None:
        return _load(self.check) if self.check else None

    def report_function(self) -> Callable[..., list[str]] | None:
        return _load(self.report) if self.report else None


@dataclass
class StageOptions:
    """Per-invocation options a stage may use (the CLI's flags beyond the spec)."""

    #: train/search: a checkpoint URI, or "latest" for the stage folder's newest complete one
    resume: str | None = None
    #: train: load a ``--resume`` checkpoint from outside the run dir although DeepSpeed
    #: unpickles it (``--trust-checkpoint``): only for checkpoints you made yourself
    trust_checkpoint: bool = False
    #: train: ``bigopt.train.hooks.TrainHooks`` (model transforms, teacher loss, step callbacks)
    hooks: Any = None
    #: wall-clock start-up marks of this invocation (``process_start``, ``ray_up``, ...)
    startup: dict[str, float] | None = None
    #: the stages this invocation runs (a lone ``--resume latest`` stage must find a checkpoint)
    stages_run: list[str] = field(default_factory=list)
    #: train: extra Ray Train callbacks (a Tune trial's ``TuneReportCallback``)
    ray_callbacks: list[Any] = field(default_factory=list)
    #: a quiet console: the local folder for logs (workers write theirs there, stages show
    #: progress bars instead of log lines); None: output goes where it always went
    log_dir: str | None = None


def _load(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


STAGES: tuple[Stage, ...] = (
    Stage("data", "prepare the data: read, check, split, write Parquet shards + manifest",
          consumes=(), produces="data",
          run="bigopt.data.cache:cached_data_stage", report="bigopt.data.cache:report_section"),
    Stage("search", "search architectures and hyperparameters with Ray Tune (trials run the "
          "trainer); writes trials, Pareto fronts and the best configuration",
          consumes=("data",), produces="search",
          run="bigopt.search.stage:search_stage", report="bigopt.search.stage:report_section",
          resumable=True),
    Stage("train", "train the model with Ray Train + DeepSpeed (or DDP); after a search, the "
          "best configuration at the spec's full budget",
          consumes=("data",), produces="model", optional=("search",),
          run="bigopt.train.stage:train_stage", report="bigopt.train.stage:report_section",
          resumable=True),
    Stage("compress", "compress the model: the compress.steps recipe (prune, distill, quantize), "
          "fine-tuning on the train section's engine; one measured model artifact per step",
          consumes=("model", "data"), produces="model",
          run="bigopt.compress.stage:compress_stage", report="bigopt.compress.stage:report_section",
          check="bigopt.compress.stage:check_inputs"),
    Stage("export", "export for deployment: ONNX, int8 ONNX and ExecuTorch .pte files, each "
          "parity-checked with its runtime and described by a model_card.json",
          consumes=("model", "data"), produces="export",
          run="bigopt.export.stage:export_stage", report="bigopt.export.stage:report_section"),
)


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(stage_names())}")


def producers_before(stage: Stage, kind: str) -> list[Stage]:
    """Stages before ``stage`` that produce ``kind``, nearest first (compress will consume
    the model that train produced, export the newest model of the two)."""
    before = STAGES[: STAGES.index(stage)]
    return [s for s in reversed(before) if s.produces == kind]
