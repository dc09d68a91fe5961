"""The train stage, driver side: Ray's own config objects built from the spec, then fit."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from bigopt.data.ingest import input_columns
from bigopt.runtime import RunDir
from bigopt.spec import JobSpec, TrainSpec, dump_spec
from bigopt.train.parallel import resolve_precision

log = logging.getLogger("bigopt")


@dataclass(frozen=True)
class TrainStageResult:
    result: dict[str, Any]
    checkpoint_uri: str | None


def ray_configs(spec: JobSpec, run: RunDir) -> dict[str, Any]:
    """ScalingConfig, RunConfig (+ checkpoint/failure) and DataConfig for TorchTrainer."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

    cluster, train = spec.cluster, spec.train
    assert train is not None
    use_gpu = cluster.gpus_per_worker > 0
    resources = {"CPU": cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    deterministic = _deterministic(train)
    execution = ray.data.ExecutionOptions(preserve_order=deterministic)
    return {
        "scaling_config": ScalingConfig(
            num_workers=cluster.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
            placement_strategy=cluster.placement),
        "run_config": RunConfig(
            # Ray puts each checkpoint in <storage_path>/<name>/step_NNNNNN: the run dir's
            # train/checkpoints/, on local disk or S3 alike.
            name="checkpoints", storage_path=run.sub("train"), storage_filesystem=run.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_last),
            failure_config=FailureConfig(max_failures=train.max_failures)),
        # Deterministic mode deals batches by rank inside the worker, so nothing is split.
        "dataset_config": DataConfig(
            datasets_to_split=[] if deterministic else ["train"], execution_options=execution),
    }


def _deterministic(train: TrainSpec) -> bool:
    return train.data_order == "deterministic" or (
        train.data_order == "auto" and train.pipeline.stages > 1)


def run_train(spec: JobSpec, run: RunDir, *, resume_from: str | None = None,
              data: RunDir | None = None) -> TrainStageResult:
    """Train on ``data``/data (default: the run's own) with Ray Train.

    ``resume_from`` is a checkpoint directory: a local path, an ``s3://`` URI, or a path inside
    ``run.fs`` (as ``latest_checkpoint`` returns).
    """
    data = data or run
    import ray.data
    from ray.train.torch import TorchConfig, TorchTrainer

    assert spec.train is not None
    precision = resolve_precision(spec.train, has_gpu=spec.cluster.gpus_per_worker > 0)
    if spec.train.precision == "auto":  # record the choice in the resolved spec
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"precision": precision})})
        run.write_text("spec.yaml", dump_spec(spec))
    # Training workers log their own progress lines; Ray Data's per-worker bars would
    # interleave on the console (the data context is captured here, in the driver).
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not (data.exists("data/train") and data.exists("data/val")):
        raise FileNotFoundError(f"{data.uri}/data needs train/ and val/ shards: run the data stage")
    datasets = {
        split: ray.data.read_parquet(data.sub(f"data/{split}"), filesystem=data.fs)
        .select_columns(list(input_columns(spec)))  # pushed down into the Parquet read
        for split in ("train", "val")
    }
    # Every worker iterates the whole validation set (and, in deterministic mode, the whole
    # training set) with its own Ray Data execution. Executions that each need a read task
    # can deadlock on a busy cluster: one worker's backpressured reader holds the CPU the
    # other's needs while both wait in an all-reduce (seen with 2 workers on 2 cores).
    # Materialized, those datasets are read from the object store with no tasks at all.
    datasets["val"] = datasets["val"].materialize()
    if _deterministic(spec.train):
        datasets["train"] = datasets["train"].materialize()
    trainer = TorchTrainer(
        _entry,
        train_loop_config={"spec": spec.model_dump(mode="json"), "run_uri": run.uri,
                           "precision": precision, "resume_uri": resume_uri(run, resume_from),
                           # identifies this fit's checkpoints for a restart (checkpoint.py)
                           "session": uuid.uuid4().hex},
        torch_config=TorchConfig(backend="nccl" if spec.cluster.gpus_per_worker > 0 else "gloo"),
        datasets=datasets,
        **ray_configs(spec, run),
    )
    result = trainer.fit()
    checkpoint = result.checkpoint
    return TrainStageResult(
        result=run.read_json("train/result.json"),
        checkpoint_uri=(("s3://" if not run.is_local else "") + checkpoint.path) if checkpoint else None,
    )


def resume_uri(run: RunDir, checkpoint: str | None) -> str | None:
    """A checkpoint as a URI workers can open: paths found inside an S3 run dir get s3://."""
    if checkpoint is None or "://" in checkpoint or run.is_local:
        return checkpoint
    return "s3://" + checkpoint


def _entry(config: dict[str, Any]) -> None:
    # Imported on the worker, so DeepSpeed is never imported in the driver.
    from bigopt.train.loop import train_loop_per_worker

    train_loop_per_worker(config)


def latest_checkpoint(run: RunDir) -> str | None:
    """Path (inside run.fs) of the newest ``train/checkpoints/step_*`` directory every rank
    finished writing, if any (a directory cut short by a crash is skipped)."""
    from bigopt.train.checkpoint import complete_checkpoints

    done = complete_checkpoints(run)
    return done[-1] if done else None
