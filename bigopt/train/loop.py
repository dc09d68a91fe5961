"""The one training loop, for every strategy and model, under Ray Train or in one process.

``train(job, data, out, ctx, reporter, hooks)`` is the trainer: a function of the resolved job,
the data artifact and the output run dir, given its rank, world size and data iterators by its
caller (``TrainContext``) and a ``Reporter`` for metrics and checkpoints. It reads no Ray
globals, so Ray Train calls it (``bigopt.train.stage``) and so does a Tune trial
(``bigopt.train.trial``). ``Trainer.__init__`` builds the pieces in a visible order; ``fit``
and ``train_step`` read top to bottom. The difference between pipeline and non-pipeline lives
in ``forward_backward`` (and its eval twin) as a single branch; DDP runs through the same calls
via ``DDPEngine``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bigopt.artifacts import DataArtifact, ModelArtifact
from bigopt.data.ingest import TimedBatches, epoch_batches
from bigopt.models import LayeredModel, from_arch
from bigopt.resolve import ResolvedJob
from bigopt.runtime import RunDir
from bigopt.tasks import get_task
from bigopt.train.checkpoint import CheckpointManager
from bigopt.train.engine import (
    DDPEngine,
    DeepSpeedCheckpointing,
    build_deepspeed_engine,
    model_init_context,
)
from bigopt.train.hooks import TrainHooks
from bigopt.train.metrics import ConsoleSink, JsonlSink, MetricsProcessor, MetricsSink, peak_flops
from bigopt.train.parallel import Layout, check_precision_supported, micro_batches_per_step
from bigopt.train.reporting import Reporter

log = logging.getLogger("bigopt")


@dataclass
class TrainContext:
    """What the caller of the trainer knows and the trainer must not look up itself."""

    rank: int
    world_size: int
    device: torch.device
    #: anything with ``iter_torch_batches`` (a Ray Data shard iterator or a Dataset)
    train_data: Any
    val_data: Any
    #: the data artifact's test split (materialized), evaluated in full after the last step
    test_data: Any = None
    #: identifies this fit's own checkpoints for a restart (checkpoint.py); None in Tune trials
    session: str | None = None
    #: an explicit checkpoint to start from (``--resume``)
    resume_uri: str | None = None
    #: wall-clock marks of the driver's start-up (``process_start``, ``ray_up``, ...)
    startup: dict[str, float] | None = None


def build_model(job: ResolvedJob) -> LayeredModel:
    """The job's model; with ZeRO-3 built partitioned, so no rank holds all of it."""
    assert job.arch is not None
    with model_init_context(job.deepspeed_config):
        return from_arch(job.arch)


@contextlib.contextmanager
def saved_activation_bytes() -> Iterator[dict[str, int]]:
    """Bytes of the tensors autograd saves for backward inside the block (each storage once):
    the activation memory a forward pass leaves behind."""
    seen: set[int] = set()
    total = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total["bytes"] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    val_losses: dict[int, float]
    ingest: dict[str, Any] | None = None


class Trainer:
    def __init__(self, job: ResolvedJob, out: RunDir, ctx: TrainContext, reporter: Reporter,
                 hooks: TrainHooks | None = None):
        """Builds the parts in the order they depend on each other: layout, model + engine
        (the hooks' transforms in between), data, metrics and checkpoints."""
        self.startup = {**(ctx.startup or {}), "trainer_init": time.time()}
        train = job.spec.train
        assert train is not None and job.layout is not None and job.precision is not None
        self.job, self.train_spec, self.run, self.precision = job, train, out, job.precision
        self.task, self.hooks, self.reporter = get_task(job.task), hooks or TrainHooks(), reporter
        self.rank, self.device, self.session = ctx.rank, ctx.device, ctx.session
        self.layout = self.build_layout(ctx.world_size)
        # Same seed on every rank: identical initial weights without a broadcast.
        seed_everything(train.seed)
        self.engine, ckpt_target = self.build_engine()
        self.startup["engine_built"] = time.time()
        # Dropout draws differ per data-parallel rank from here on (as in Megatron): the same
        # masks on every rank would waste the noise. Restored from checkpoints on resume.
        torch.manual_seed(train.seed + 1 + self.rank)
        self.batches = self.build_batches(ctx)
        self.val_data, self.test_data = ctx.val_data, ctx.test_data
        self.metrics = self.build_metrics(ctx.world_size)
        # every rank saves its shard; the reporter persists them
        self.checkpointer = CheckpointManager(ckpt_target, reporter, every=train.checkpoint_every,
                                              world_rank=self.rank, at=train.checkpoint_at,
                                              session=ctx.session)
        self.step, self.samples_seen, self.resume_uri = 0, 0, ctx.resume_uri
        self.val_losses: dict[int, float] = {}
        self.val_metrics: dict[int, dict[str, float]] = {}
        self._val_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # ------------------------------------------------------------------ builders
    def build_layout(self, world_size: int) -> Layout:
        """Who is who: the pipeline x data-parallel layout resolved in the driver, checked
        against the ranks actually running."""
        layout = self.job.layout
        assert layout is not None
        if world_size != layout.world_size:
            raise ValueError(f"cluster.num_workers: the job was resolved for {layout.world_size} "
                             f"workers, but {world_size} are running it")
        built = Layout(world_size, layout.pp_stages, layout.zero_stage)
        if self.hooks.teacher is not None and built.pp_enabled:
            raise ValueError("train.pipeline.stages: a distillation teacher needs stages: 1")
        return built

    def build_engine(self) -> tuple[Any, Any]:
        """The model (partitioned under ZeRO-3: a collective, so DeepSpeed's process group
        first), the hooks' transforms, the teacher, then the engine that owns optimizer,
        schedule, precision and sharding. Returns (engine, what the checkpointer saves)."""
        train = self.train_spec
        if train.strategy == "deepspeed":
            import deepspeed
            from deepspeed.accelerator import get_accelerator

            check_precision_supported(self.precision,
                                      fp16_supported=get_accelerator().is_fp16_supported(),
                                      device=get_accelerator().device_name())
            from bigopt.train.ops import skip_unused_ops

            skip_unused_ops()  # no ~40 s build of an op training never calls
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        model = build_model(self.job)
        for transform in self.hooks.model_transforms:
            model = transform(model)
        self.flops_per_sample = float(model.flops_per_sample())
        self.loss_fn = self.task.loss
        self.teacher = None
        if self.hooks.teacher is not None:
            self.teacher = self.hooks.teacher().to(self.device).eval()
            assert self.hooks.loss_builder is not None
            self.loss_fn = self.hooks.loss_builder(self.task.loss)
        if train.strategy == "deepspeed":
            self.ds_config = self.job.deepspeed_config
            assert self.ds_config is not None
            engine = build_deepspeed_engine(model, self.task.loss, self.ds_config, train,
                                            pp_stages=self.layout.pp_stages,
                                            partition=train.pipeline.partition)
            return engine, DeepSpeedCheckpointing(engine)
        self.ds_config = None
        engine = DDPEngine(model, train, self.precision, self.device)
        return engine, engine

    def build_batches(self, ctx: TrainContext) -> TimedBatches:
        """Ray Data shards as timed, endless batch iterators; in the deterministic order every
        rank reads the same sequence and keeps its data-parallel share."""
        train = self.train_spec
        self.columns = self.task.columns
        self.micro_batches = micro_batches_per_step(train, self.layout)
        self.deterministic = self.job.data_order == "deterministic"
        if self.deterministic:  # this process's executions keep block order too
            import ray.data

            ray.data.DataContext.get_current().execution_options.preserve_order = True
        dp_rank = self.layout.dp_rank(self.rank)
        self._input_window = {"time": 0.0, "wait": 0.0, "rows": 0}  # ranks_input's, per log window
        return TimedBatches(epoch_batches(
            ctx.train_data, batch_size=train.batch_size, seed=train.seed,
            dp=self.layout.dp if self.deterministic else 1,
            dp_rank=dp_rank if self.deterministic else 0,
            shuffle_buffer=train.shuffle_buffer, columns=self.columns, device=self.device,
            augment=self.train_time_augment(self.job), float_dtype=self.input_dtype,
            node_cache_bytes=int(train.node_cache_gb * 2**30)))

    @property
    def input_dtype(self) -> torch.dtype | None:
        """The dtype floating inputs must have: a DeepSpeed engine in bf16/fp16 holds its
        weights in it and does not cast inputs (ddp autocasts fp32 weights: inputs stay)."""
        if self.train_spec.strategy != "deepspeed":
            return None
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def build_metrics(self, world_size: int) -> MetricsProcessor:
        """Throughput, MFU where the device's peak is known; rank 0 writes metrics.jsonl."""
        train = self.train_spec
        sinks: list[MetricsSink] = ([JsonlSink(self.run), ConsoleSink(train.max_steps)]
                                    if self.rank == 0 else [])
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        peak = peak_flops(device_name)
        return MetricsProcessor(
            sinks, train.log_every,
            samples_per_step=train.batch_size * self.micro_batches * self.layout.dp,
            tokens_per_sample=self.task.tokens_per_sample(self.job.context),
            flops_per_sample=self.flops_per_sample,
            peak_flops_total=peak * world_size if peak else None)

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        train = self.train_spec
        state = self.checkpointer.load(self.resume_uri)
        self.resumed_from = state["step"] if state else None
        self.restarts = self.count_attempt() - 1
        if state:
            self.step, self.samples_seen = state["step"], state["samples_seen"]
            self.apply_spec_lr()
            self.resumed_weights = self.weights_digest()
            self.val_losses = {int(k): v for k, v in state.get("val_losses", {}).items()}
            if self.deterministic:
                self.batches.skip(state["batches_consumed"])
        else:
            self.evaluate()  # step-0 val loss: the baseline the report compares against
        loss = float("nan")
        while self.step < train.max_steps:
            self.step += 1
            last = self.step == train.max_steps
            loss, step_time = self.train_step()
            if "first_step" not in self.startup:
                self.startup["first_step"] = time.time()
            self.samples_seen += self.metrics.samples_per_step
            data_wait = self.batches.take_wait()
            extra = {**self.precision_stats(), **self.memory_stats(), **self.ingest_stats(),
                     **self.ranks_input(step_time, data_wait, last),
                     **self.hooks.callback_metrics()}
            evaluated = (train.eval_every and self.step % train.eval_every == 0) or last
            if evaluated:
                extra["val_loss"] = self.evaluate()
                extra.update(self.val_metrics.get(self.step, {}))
            self.metrics.record(self.step, loss=loss, step_time=step_time,
                                data_wait=data_wait, lr=self.lr, last=last, extra=extra)
            if self.checkpointer.should_save(self.step, last):
                # metrics.jsonl is never behind the checkpoint a restarted run resumes from
                self.metrics.flush()
            # Validation metrics reach the caller at every eval (a Tune scheduler decides on
            # them), with the checkpoint when there is one.
            reported = {"step": self.step, "loss": loss}
            if evaluated:
                reported.update(val_loss=extra["val_loss"], **self.val_metrics.get(self.step, {}))
            if not self.checkpointer.save(self.step, self.state_dict(), reported, last=last) and evaluated:
                self.reporter.report(reported)
        if self.checkpointer.last_saved is None:
            # resumed from a checkpoint at max_steps (a PBT trial paused at its end, a resume
            # of a finished run): no step ran, so save the restored state as this run's own
            reported = {"step": self.step, "val_loss": self.evaluate(),
                        **self.val_metrics.get(self.step, {})}  # a scheduler needs its metric
            self.checkpointer.save(self.step, self.state_dict(), reported, last=True)
        self.metrics.close()
        return TrainResult(self.step, loss, self.val_losses, self.ingest_counts())

    @property
    def rank_stream(self) -> Any:
        """This rank's ``RankStream`` (the deterministic order), or None (streaming order)."""
        return getattr(self.batches.batches, "stream", None)

    def gather_by_rank(self, values: list[float]) -> list[list[float]]:
        """``values`` of every rank, in rank order (a collective every rank joins)."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if world > 1 else 0
        table = torch.zeros(world, len(values), dtype=torch.float64)
        table[rank] = torch.tensor(values, dtype=torch.float64)
        if world > 1:
            if torch.distributed.get_backend() == "nccl":
                table = table.to(self.device)
            torch.distributed.all_reduce(table)
        return table.cpu().tolist()

    def ranks_input(self, step_time: float, data_wait: float, last: bool) -> dict[str, Any]:
        """Every rank's data-wait share of step time and training rows read per second since
        the last log point, gathered at log points (log points are the same steps on every
        rank); rank 0's metrics rows carry them."""
        window = self._input_window
        window["time"] += step_time
        window["wait"] += data_wait
        if not self.metrics.should_log(self.step, last):
            return {}
        stream = self.rank_stream
        rows = stream.counter.read if stream is not None else 0
        seconds = max(window["time"], 1e-9)
        gathered = self.gather_by_rank([window["wait"] / seconds, (rows - window["rows"]) / seconds])
        self._input_window = {"time": 0.0, "wait": 0.0, "rows": rows}
        out = {"data_wait_frac_by_rank": [round(wait, 4) for wait, _ in gathered]}
        if stream is not None:
            out["rows_read_per_s_by_rank"] = [round(rate, 1) for _, rate in gathered]
        return out

    def ingest_stats(self) -> dict[str, Any]:
        """This rank's cumulative ingest counters for the metrics rows: training rows decoded
        and, for s3:// shards, remote GETs and bytes (a node cache turns later epochs' reads
        into local hits)."""
        stream = self.rank_stream
        if stream is None:
            return {}
        out = {"ingest_epoch": stream.epoch, "ingest_rows_read": stream.counter.read}
        if stream.plan.uri.startswith("s3://"):
            out.update(remote_gets=stream.remote.gets, remote_bytes=stream.remote.bytes,
                       node_cache_hits=stream.remote.hits)
        return out

    def ingest_counts(self) -> dict[str, Any] | None:
        """Training rows each rank read (decoded) and used in this attempt, gathered on every
        rank (a collective): the read amplification of the deterministic order, where each
        data-parallel rank reads only its share. None for a streaming order."""
        stream = self.rank_stream
        if stream is None:
            return None
        gathered = self.gather_by_rank([stream.counter.read, stream.counter.used])
        out = {"split_rows": stream.plan.total_rows, "epochs_started": stream.epoch + 1,
               "rows_read_by_rank": [int(read) for read, _ in gathered],
               "rows_used_by_rank": [int(used) for _, used in gathered]}
        if stream.plan.uri.startswith("s3://"):  # this rank's remote traffic, per epoch
            out["remote"] = {"node_cache": stream.node_cache is not None,
                             **stream.remote.snapshot(), "per_epoch": stream.remote.per_epoch}
        return out

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (loss averaged over data-parallel ranks, seconds)."""
        start = time.perf_counter()
        self.engine.train()
        loss = self.forward_backward()
        for callback in self.hooks.step_callbacks:
            callback(self.engine.module, self.step)
        loss = self.all_reduce_mean(loss)
        return loss, time.perf_counter() - start

    def forward_backward(self) -> float:
        if self.layout.pp_enabled:
            # The pipeline engine pulls `micro_batches` batches itself: inputs on the first
            # stage, labels on the last, each from this rank's iterator.
            return float(self.engine.train_batch(data_iter=self.batches))
        losses = []
        for micro in range(self.micro_batches):
            x, y = next(self.batches)
            if self.step == 1 and micro == 0:
                with saved_activation_bytes() as saved:
                    output = self.engine(x)
                self.saved_activation_mb = saved["bytes"] / 2**20
            else:
                output = self.engine(x)
            loss = self.compute_loss(output, y, x)
            self.engine.backward(loss)
            self.engine.step()  # steps the optimizer only at the accumulation boundary
            losses.append(loss.item())
        return sum(losses) / len(losses)

    def compute_loss(self, output: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            loss = self.loss_fn(output, target)
        else:
            with torch.no_grad():  # the teacher is an fp32 module
                teacher_output = self.teacher(inputs.float() if inputs.is_floating_point()
                                              else inputs)
            loss = self.loss_fn(output, target, teacher_output)
        for regularizer in self.hooks.regularizers:
            loss = loss + regularizer(self.engine.module)
        return loss

    def evaluate(self) -> float:
        """Validation loss (and the task's metrics) now: ``bigopt.train.evaluation``."""
        from bigopt.train.evaluation import evaluate

        return evaluate(self)

    def evaluate_test(self) -> dict[str, float]:
        """The whole test split once: ``bigopt.train.evaluation``."""
        from bigopt.train.evaluation import evaluate_test

        return evaluate_test(self)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def train_time_augment(job: ResolvedJob) -> Any:
        """``data.augment`` when it asks for on-the-fly augmentation of training batches."""
        data = job.spec.data
        augment = data.augment if data is not None else None
        return augment if augment is not None and augment.when == "train" else None

    def weights_digest(self) -> str:
        """SHA-256 of the model's state (tensors by name, in name order): what a restore loaded,
        comparable with the checkpoint's own file (tests check that PBT's exploit continued
        from the donor's weights)."""
        import hashlib

        digest = hashlib.sha256()
        state = self.engine.module.state_dict()
        for name in sorted(state):
            digest.update(name.encode())
            # raw bytes via uint8: numpy has no bfloat16, and bf16 is the CPU default
            digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                          .numpy().tobytes())
        return digest.hexdigest()

    def apply_spec_lr(self) -> None:
        """Make the spec's ``train.lr`` the base lr after a checkpoint load, which restores the
        saved scheduler's. A plain resume has the same lr (no change); a PBT exploit loads a
        better trial's checkpoint under this trial's new, perturbed lr, which must win."""
        sched = getattr(self.engine, "scheduler", None) or getattr(self.engine, "lr_scheduler", None)
        if sched is None or not hasattr(sched, "base_lrs"):
            return
        sched.base_lrs = [self.train_spec.lr for _ in sched.base_lrs]
        for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs,
                                       sched.lr_lambdas, strict=True):
            group["lr"] = base * factor(sched.last_epoch)

    def count_attempt(self) -> int:
        """This fit's attempt number (1 = first; Ray Train restarts the worker group after a
        failure), counted per session in the stage folder's ``attempts.json`` by rank 0."""
        if self.session is None or self.rank != 0:  # only rank 0 writes result.json
            return 1
        counts = self.run.read_json("attempts.json") if self.run.exists("attempts.json") else {}
        counts[self.session] = counts.get(self.session, 0) + 1
        self.run.write_json("attempts.json", counts)
        return counts[self.session]

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def precision_stats(self) -> dict[str, Any]:
        if self.precision != "fp16":
            return {}
        optimizer = getattr(self.engine, "optimizer", None)
        scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
        return {"loss_scale": float(scale) if scale is not None else None,
                "skipped_steps": int(getattr(self.engine, "skipped_steps", 0))}

    def memory_stats(self) -> dict[str, float]:
        """Peak memory of this rank's process (rank 0 logs; ranks are symmetric under ZeRO)."""
        import resource

        stats = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if torch.cuda.is_available():
            stats["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return stats

    def engine_facts(self) -> dict[str, Any]:
        """What the strategy actually did on this rank, so tests can check it took effect:
        parameters held (ZeRO-3 holds ~1/N), the optimizer that steps (DeepSpeedCPUAdam with
        offload), activation memory saved for backward at step 1 (lower with checkpointing)."""
        from bigopt.models.base import full_numel

        module = self.engine.module
        params = list(module.parameters())
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        optimizer = getattr(self.engine, "optimizer", None)
        inner = getattr(optimizer, "optimizer", optimizer)
        return {"params_total": sum(full_numel(p) for p in params), "params_held": held,
                "optimizer": type(optimizer).__name__, "inner_optimizer": type(inner).__name__,
                "saved_activation_mb": getattr(self, "saved_activation_mb", None)}

    def all_reduce_mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.to(self.device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / torch.distributed.get_world_size()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "samples_seen": self.samples_seen,
                "batches_consumed": self.batches.consumed, "val_losses": self.val_losses}

    def result(self, fit: TrainResult) -> dict[str, Any]:
        """What the stage folder's ``result.json`` records (rank 0 writes it)."""
        return {
            "steps": fit.steps, "final_loss": fit.final_loss, "task": self.job.task,
            "val_losses": {str(k): v for k, v in sorted(fit.val_losses.items())},
            "val_accuracy": {str(k): m["val_acc"] for k, m in sorted(self.val_metrics.items())
                             if "val_acc" in m},
            # the checkpoint step this (last) attempt started from: after --resume or a failure
            "resumed_from": self.resumed_from,
            "resumed_weights_sha256": getattr(self, "resumed_weights", None),
            "resumed_checkpoint": self.checkpointer.loaded_from,
            # worker-group restarts after failures in this fit (Ray Train's FailureConfig)
            "restarts": self.restarts,
            "strategy": self.train_spec.strategy, "precision": self.precision,
            "layout": vars(self.layout) | {"dp": self.layout.dp},
            "deepspeed_config": self.ds_config,
            "engine": self.engine_facts(),
            "ingest": fit.ingest,
            **self.startup_report(),
        }

    def startup_report(self) -> dict[str, Any]:
        """Seconds from the driver process's start to each start-up mark, and to step 1."""
        origin = self.startup.get("process_start")
        if origin is None or "first_step" not in self.startup:
            return {}
        marks = {k: round(v - origin, 2) for k, v in sorted(self.startup.items(), key=lambda kv: kv[1])}
        return {"time_to_first_step_s": marks["first_step"], "startup_s": marks}


def train(job: ResolvedJob, data: DataArtifact, out: RunDir, ctx: TrainContext,
          reporter: Reporter, hooks: TrainHooks | None = None) -> ModelArtifact:
    """Train ``job`` on ``data`` into the stage folder ``out``; every rank returns the same model
    artifact (rank 0 also writes ``result.json`` and the consolidated ``model.safetensors``).

    ``data`` is only checked here (task and columns must match the job); the caller has turned
    its splits into ``ctx.train_data``/``ctx.val_data`` (and ``ctx.test_data``: when given, the
    whole test split is evaluated once after the last step, into ``test_loss``/``test_accuracy``).
    """
    if data.task != job.task or (job.context and data.context != job.context):
        raise ValueError(f"data: the artifact from {data.run} holds {data.task} data with context "
                         f"{data.context}; this job trains a {job.task} with context {job.context}")
    trainer = Trainer(job, out, ctx, reporter, hooks)
    fit = trainer.fit()
    test = trainer.evaluate_test()
    from bigopt.train.results import write_result

    return write_result(trainer, fit, test)
