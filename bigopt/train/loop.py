"""The one training loop, run by every Ray Train worker, for every strategy and model.

``Trainer.__init__`` builds the pieces in a visible order; ``fit`` and ``train_step`` read top to
bottom. The difference between pipeline and non-pipeline lives in ``forward_backward`` (and its
eval twin) as a single branch; DDP runs through the same calls via ``DDPEngine``.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from bigopt.data.ingest import TimedBatches, epoch_batches, input_columns
from bigopt.models import GPT_PRESETS, build_model
from bigopt.runtime import RunDir
from bigopt.spec import GPTModelSpec, JobSpec
from bigopt.train.checkpoint import CheckpointManager
from bigopt.train.engine import DDPEngine, DeepSpeedCheckpointing, build_deepspeed_engine
from bigopt.train.metrics import (
    ConsoleSink,
    JsonlSink,
    MetricsProcessor,
    MetricsSink,
    peak_flops,
)
from bigopt.train.parallel import (
    Layout,
    build_deepspeed_config,
    check_precision_supported,
    micro_batches_per_step,
)

log = logging.getLogger("bigopt")


def build_model_from_spec(spec: JobSpec) -> nn.Module:
    """The spec's model: a GPT preset, overridden by fields set explicitly, or plain fields."""
    m = spec.model
    assert m is not None
    cfg = m.model_dump(exclude={"kind", "preset"})
    if isinstance(m, GPTModelSpec):
        if m.preset:
            explicit = m.model_dump(exclude_unset=True, exclude={"kind", "preset"})
            cfg = {**GPT_PRESETS[m.preset], **explicit}
        cfg["activation_checkpointing"] = spec.train.activation_checkpointing if spec.train else False
    return build_model(m.kind, **cfg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loss_in_fp32(loss_fn: Any) -> Any:
    # bf16/fp16 logits lose precision in softmax; the loss is computed in fp32 everywhere.
    def fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_fn(output.float(), target)
    return fn


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    val_losses: dict[int, float]


class Trainer:
    def __init__(self, spec: JobSpec, run: RunDir, precision: str, resume_uri: str | None = None,
                 session: str | None = None):
        import ray.train
        import ray.train.torch

        assert spec.train is not None
        self.spec, self.train_spec, self.run, self.precision = spec, spec.train, run, precision
        train = spec.train
        # 1. Who am I: world rank and the pipeline x data-parallel layout.
        ctx = ray.train.get_context()
        self.rank, world = ctx.get_world_rank(), ctx.get_world_size()
        zero_stage = train.zero.stage if train.strategy == "deepspeed" else 0
        self.layout = Layout(world, train.pipeline.stages, zero_stage)
        self.device = ray.train.torch.get_device()
        # 2. Same seed on every rank: identical initial weights without a broadcast.
        seed_everything(train.seed)
        # 3. Model, then the engine that owns optimizer, schedule, precision and sharding.
        model = build_model_from_spec(spec)
        self.loss_fn = loss_in_fp32(type(model).loss)
        self.flops_per_sample = float(model.flops_per_sample())
        self.tokens_per_sample = (spec.context or 0) if isinstance(spec.model, GPTModelSpec) else 0
        if train.strategy == "deepspeed":
            import deepspeed
            from deepspeed.accelerator import get_accelerator

            check_precision_supported(precision,
                                      fp16_supported=get_accelerator().is_fp16_supported(),
                                      device=get_accelerator().device_name())
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
            self.ds_config = build_deepspeed_config(spec, self.layout, precision)
            self.engine = build_deepspeed_engine(
                model, self.loss_fn, self.ds_config, train,
                pp_stages=self.layout.pp_stages, partition=train.pipeline.partition)
            ckpt_target: Any = DeepSpeedCheckpointing(self.engine)
        else:
            self.engine = DDPEngine(model, train, precision, self.device)
            ckpt_target = self.engine
        # Dropout draws differ per data-parallel rank from here on (as in Megatron): the same
        # masks on every rank would waste the noise. Restored from checkpoints on resume.
        torch.manual_seed(train.seed + 1 + self.rank)
        # 4. Data: Ray Data shards streamed into timed, endless batch iterators.
        self.columns = input_columns(spec)
        self.micro_batches = micro_batches_per_step(train, self.layout)
        self.deterministic = train.data_order == "deterministic" or (
            train.data_order == "auto" and self.layout.pp_enabled)
        dp_rank = self.layout.dp_rank(self.rank)
        self.batches = TimedBatches(epoch_batches(
            ray.train.get_dataset_shard("train"), batch_size=train.batch_size, seed=train.seed,
            dp=self.layout.dp if self.deterministic else 1,
            dp_rank=dp_rank if self.deterministic else 0,
            shuffle_buffer=train.shuffle_buffer, columns=self.columns, device=self.device))
        self.val_shard = ray.train.get_dataset_shard("val")
        # 5. Metrics (rank 0 writes) and checkpoints (every rank saves its shard).
        sinks: list[MetricsSink] = [JsonlSink(run), ConsoleSink(train.max_steps)] if self.rank == 0 else []
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        peak = peak_flops(device_name)
        self.metrics = MetricsProcessor(
            sinks, train.log_every,
            samples_per_step=train.batch_size * self.micro_batches * self.layout.dp,
            tokens_per_sample=self.tokens_per_sample, flops_per_sample=self.flops_per_sample,
            peak_flops_total=peak * world if peak else None)
        self.checkpointer = CheckpointManager(ckpt_target, every=train.checkpoint_every,
                                              world_rank=self.rank, at=train.checkpoint_at,
                                              run=run, session=session)
        self.step, self.samples_seen, self.resume_uri = 0, 0, resume_uri
        self.val_losses: dict[int, float] = {}
        self._val_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.val_accuracy: dict[int, float] = {}

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        train = self.train_spec
        state = self.checkpointer.load(self.resume_uri)
        self.resumed_from = state["step"] if state else None
        if state:
            self.step, self.samples_seen = state["step"], state["samples_seen"]
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
            self.samples_seen += self.metrics.samples_per_step
            extra = {**self.precision_stats(), **self.memory_stats()}
            if (train.eval_every and self.step % train.eval_every == 0) or last:
                extra["val_loss"] = self.evaluate()
                if self.step in self.val_accuracy:
                    extra["val_acc"] = self.val_accuracy[self.step]
            self.metrics.record(self.step, loss=loss, step_time=step_time,
                                data_wait=self.batches.take_wait(), lr=self.lr, last=last,
                                extra=extra)
            if self.checkpointer.should_save(self.step, last):
                # metrics.jsonl is never behind the checkpoint a restarted run resumes from
                self.metrics.flush()
            self.checkpointer.save(self.step, self.state_dict(), {"loss": loss}, last=last)
        self.metrics.close()
        return TrainResult(self.step, loss, self.val_losses)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (loss averaged over data-parallel ranks, seconds)."""
        start = time.perf_counter()
        self.engine.train()
        loss = self.forward_backward()
        loss = self.all_reduce_mean(loss)
        return loss, time.perf_counter() - start

    def forward_backward(self) -> float:
        if self.layout.pp_enabled:
            # The pipeline engine pulls `micro_batches` batches itself: inputs on the first
            # stage, labels on the last, each from this rank's iterator.
            return float(self.engine.train_batch(data_iter=self.batches))
        losses = []
        for _ in range(self.micro_batches):
            x, y = next(self.batches)
            loss = self.loss_fn(self.engine(x), y)
            self.engine.backward(loss)
            self.engine.step()  # steps the optimizer only at the accumulation boundary
            losses.append(loss.item())
        return sum(losses) / len(losses)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``eval_batches`` batches per data-parallel rank."""
        train = self.train_spec
        dp, dp_rank = self.layout.dp, self.layout.dp_rank(self.rank)
        if self._val_batches is None:
            # The same first batches every time: evals are comparable across steps, and
            # holding them in memory avoids starting a Ray Data execution per eval.
            val = epoch_batches(self.val_shard, batch_size=train.batch_size, seed=0, dp=dp,
                                dp_rank=dp_rank, columns=self.columns, device=self.device)
            self._val_batches = [next(val) for _ in range(train.eval_batches)]
        self.engine.eval()
        losses = []
        if self.layout.pp_enabled:
            val = iter(self._val_batches)
            for _ in range(max(1, train.eval_batches // self.micro_batches)):
                losses.append(float(self.engine.eval_batch(data_iter=val)))
        else:
            correct, classifier = 0, False
            for x, y in self._val_batches:
                out = self.engine(x)
                losses.append(self.loss_fn(out, y).item())
                if out.dim() == 2:  # a classifier: accuracy is what its users read first
                    classifier = True
                    correct += int((out.argmax(-1) == y).sum())
            if classifier:
                rows = sum(len(y) for _, y in self._val_batches)
                self.val_accuracy[self.step] = self.all_reduce_mean(correct / rows)
        self.engine.train()
        value = self.all_reduce_mean(sum(losses) / len(losses))
        self.val_losses[self.step] = value
        return value

    # ------------------------------------------------------------------ helpers
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

    def all_reduce_mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.to(self.device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / torch.distributed.get_world_size()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "samples_seen": self.samples_seen,
                "batches_consumed": self.batches.consumed, "val_losses": self.val_losses}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: turn the boundary dict back into a validated spec first thing."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bigopt %(message)s", force=True)
    spec = JobSpec.model_validate(config["spec"])
    trainer = Trainer(spec, RunDir(config["run_uri"]), config["precision"], config.get("resume_uri"),
                      config.get("session"))
    result = trainer.fit()
    if trainer.rank == 0:
        trainer.run.write_json("train/result.json", {
            "steps": result.steps, "final_loss": result.final_loss,
            "val_losses": {str(k): v for k, v in sorted(result.val_losses.items())},
            "val_accuracy": {str(k): v for k, v in sorted(trainer.val_accuracy.items())},
            # the checkpoint step this (last) attempt started from: after --resume or a failure
            "resumed_from": trainer.resumed_from,
            "strategy": spec.train.strategy, "precision": trainer.precision,
            "layout": vars(trainer.layout) | {"dp": trainer.layout.dp},
            "deepspeed_config": getattr(trainer, "ds_config", None),
        })
