"""The train stage, driver side: Ray's own config objects built from the resolved job, then fit.

Ray Train runs ``bigopt.train.loop.train`` on every worker through ``ray_train_entry``, which
is the only place that reads Ray Train's context (rank, world size, dataset shards,
checkpoint) and hands it to the trainer.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from bigopt.artifacts import DataArtifact, ModelArtifact
from bigopt.data.partition import plan_shards
from bigopt.resolve import ResolvedJob
from bigopt.runtime import RunDir, filesystem_for
from bigopt.stages import StageOptions
from bigopt.train.layout import (
    CHECKPOINTS,
    COMPLETE_FILE,
    is_complete,
    latest_checkpoint,
    step_of,
)

log = logging.getLogger("bigopt")


def ray_configs(job: ResolvedJob, out: RunDir, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """ScalingConfig, RunConfig (+ checkpoint/failure) and DataConfig for TorchTrainer, with
    checkpoints in the stage folder ``out``."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

    cluster, train = job.spec.cluster, job.spec.train
    assert train is not None
    use_gpu = cluster.gpus_per_worker > 0
    resources = {"CPU": cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    deterministic = job.data_order == "deterministic"
    execution = ray.data.ExecutionOptions(preserve_order=deterministic)
    return {
        "scaling_config": ScalingConfig(
            num_workers=cluster.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
            placement_strategy=cluster.placement),
        "run_config": RunConfig(
            # Ray puts each checkpoint in <storage_path>/<name>/step_NNNNNN: the stage
            # folder's checkpoints/ (bigopt.train.layout), on local disk or S3 alike.
            name=CHECKPOINTS, storage_path=out.path, storage_filesystem=out.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_last),
            failure_config=FailureConfig(max_failures=job.max_failures),
            callbacks=callbacks or None),
        # In the deterministic order each rank reads its own share itself, so nothing is split
        # (its train dataset travels in the loop config).
        "dataset_config": DataConfig(
            datasets_to_split=[] if deterministic else ["train"], execution_options=execution),
    }


def plan_splits(job: ResolvedJob, data: DataArtifact, *, test: bool = False) -> dict[str, Any]:
    """The train and val splits of ``data`` as the workers get them. Training data in the
    deterministic order: a ``ShardPlan`` (files and row-group sizes) from which each
    data-parallel rank reads only its own share; in the streaming order: a lazy Dataset that Ray
    Train splits between the workers. Validation (and test) data: materialized Datasets (read
    before the workers start: by the driver itself with pyarrow when small, by Ray Data read
    tasks when large), which every worker iterates.

    Anything that needs a Ray task once training runs can deadlock on a busy
    cluster: one worker's backpressured reader holds the CPU the other's needs while both wait
    in an all-reduce (seen with 2 workers on 2 cores), and a head whose CPUs the workers take
    in full has none left at all (even ``ray.data.from_arrow`` in a worker waits on a metadata
    task there: seen with a TorchTrainer inside a Tune trial). Materialized before the workers
    start, the evaluation splits are read from the object store with no task at all, and the
    ranks read their training shares with pyarrow in a thread of their own.
    """
    import ray.data

    if job.data_order == "deterministic":
        # Datasets carry the context they were made in: keep block order in every execution
        # (the materialize here and each epoch's in the workers), or blocks that finish first
        # come first and the order changes from run to run.
        ray.data.DataContext.get_current().execution_options.preserve_order = True
    missing = [s for s in ("train", "val") if s not in data.splits]
    if missing:
        raise FileNotFoundError(f"the data artifact of {data.run} has no {'/'.join(missing)} split: "
                                "set data.split.val > 0 and run the data stage")
    sources: dict[str, Any] = {}
    # test (when asked and the artifact has one): evaluated once, after the last step
    extra = ["test"] if test and "test" in data.splits else []
    for split in ("train", "val", *extra):
        uri = data.splits[split].uri
        if split == "train" and job.data_order == "deterministic":
            # each data-parallel rank reads only its own share, straight from the shards: the
            # plan is the files and their row-group sizes (bigopt.data.partition)
            sources[split] = plan_shards(uri, list(data.columns))
            continue
        fs, path = filesystem_for(uri)
        materialize = split != "train"
        if materialize and _total_bytes(fs, path) <= DRIVER_READ_MAX_BYTES:
            sources[split] = read_split_in_driver(fs, path, list(data.columns))
            continue
        from bigopt.data.ingest import read_shards  # here: it imports torch, the data stage not

        ds = read_shards(path, fs, list(data.columns))
        sources[split] = ds.materialize() if materialize else ds
    return sources


#: A split to materialize that is smaller than this is read by the driver itself with pyarrow
#: (a fraction of a second) instead of by Ray Data read tasks (seconds of task start-up on the
#: way to the first step, BENCHMARKS.md section 4a). Larger ones are read in parallel.
DRIVER_READ_MAX_BYTES = 256 * 2**20


def _total_bytes(fs: Any, path: str) -> int:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)


def read_split_in_driver(fs: Any, path: str, columns: list[str]) -> Any:
    """One block per shard, in shard-name order (the order the data stage wrote them)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    import ray.data

    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet shards under {path}")
    # from_blocks (not from_arrow): block metadata is computed here, not by a Ray task, which
    # costs seconds of worker start-up on a fresh cluster (BENCHMARKS.md section 4a).
    return ray.data.from_blocks([pq.read_table(f, columns=columns, filesystem=fs) for f in files])


def train_stage(job: ResolvedJob, inputs: dict[str, Any], out: RunDir,
                options: StageOptions | None = None) -> ModelArtifact:
    """The train stage (stage table entry): fit with Ray Train into the stage folder ``out``,
    return the model artifact. After a search the pipeline hands it the best configuration's
    resolved job."""
    options = options or StageOptions()
    data: DataArtifact = inputs["data"]
    resume = checked_resume(out, options)
    return fit(job, data, out, options, resume=resume)


class UntrustedCheckpointError(ValueError):
    """A ``--resume`` checkpoint from outside the run dir, without ``--trust-checkpoint``."""


class IncompleteCheckpointError(ValueError):
    """A ``--resume`` checkpoint whose upload was cut short (no completion marker)."""


def refuse_incomplete(resume: str | None) -> None:
    """Refuse an explicit ``--resume`` of a bigopt checkpoint (``.../checkpoints/step_NNNNNN``)
    that has no completion marker: a run killed while uploading it leaves some ranks' files
    and not others', and DeepSpeed would fail on the missing shards, or load a mix."""
    if resume is None or resume == "latest" or step_of(resume) < 0:
        return
    head = resume.rstrip("/").rsplit("/", 2)
    if len(head) < 3 or head[1] != CHECKPOINTS:  # not bigopt's layout: nothing to go by
        return
    fs, path = filesystem_for(resume)
    if not is_complete(fs, path):
        raise IncompleteCheckpointError(
            f"--resume {resume}: this checkpoint is incomplete (no {COMPLETE_FILE}: not every "
            "rank's upload finished, e.g. the run was killed while uploading it). Resume from "
            "the newest complete one instead: --run-dir RUN --resume latest")


def checked_resume(out: RunDir, options: StageOptions) -> str | None:
    """The checkpoint URI to resume from (``latest`` resolved in ``out``), refused when it lies
    outside the run dir and the user did not say it is trusted: DeepSpeed loads its
    checkpoints with ``torch.load(weights_only=False)``, so a file from elsewhere could run
    code in every worker."""
    resume = options.resume
    if resume == "latest":
        resume = latest_checkpoint(out)
        if resume is None and len(options.stages_run) <= 1:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {out.uri_of(CHECKPOINTS)}")
        if resume is None:  # a resumed run whose training had not started: start it
            log.info("--resume latest: no checkpoint in %s yet; training starts fresh", out.uri)
        return resume_uri(out, resume)
    if resume is None:
        return None
    resume = resume_uri(out, resume)
    assert resume is not None
    if not out.parent.contains(resume) and not options.trust_checkpoint:
        raise UntrustedCheckpointError(
            f"--resume {resume}: this checkpoint is outside the run dir {out.parent.uri}, and "
            "DeepSpeed loads checkpoints with pickle (torch.load(weights_only=False)), which can "
            "run code from the file. Resume inside the run dir (--run-dir RUN --resume latest), "
            "start from its consolidated weights instead, or pass --trust-checkpoint if you made "
            "this checkpoint yourself")
    return resume


def fit(job: ResolvedJob, data: DataArtifact, out: RunDir, options: StageOptions, *,
        resume: str | None) -> ModelArtifact:
    """One Ray Train fit of ``job`` on ``data`` into the stage folder ``out`` (the train stage,
    and a compress stage's fine-tuning steps)."""
    import ray.data
    from ray.train.torch import TorchConfig, TorchTrainer

    # Training workers log their own progress lines; Ray Data's per-worker bars would
    # interleave on the console (the data context is captured here, in the driver).
    ray.data.DataContext.get_current().enable_progress_bars = False
    splits = plan_splits(job, data, test=True)
    startup = options.startup
    if startup is not None:
        startup["data_planned"] = time.time()
    # streaming: Ray Train splits the training data between the workers (DataConfig)
    datasets = {"train": splits.pop("train")} if job.data_order == "streaming" else {}
    if datasets:
        warn_if_readers_starve(job)
    if job.spec.train.strategy == "deepspeed" and job.spec.train.zero.offload_optimizer:
        from bigopt.train.ops import prepare_ops

        # CPU Adam's ~1 min build once here, not raced by every worker; the other ops are
        # seconds to build and are left to the workers (no import of DeepSpeed in the driver)
        prepare_ops(job.deepspeed_config)
    trainer = TorchTrainer(
        ray_train_entry,
        train_loop_config={"job": job.model_dump(mode="json"), "data": data.model_dump(mode="json"),
                           # what the workers read themselves: materialized val (and test)
                           # splits, and in the deterministic order the train split's shard
                           # plan, of which each data-parallel rank reads its own share
                           "splits": splits,
                           "run_uri": out.uri, "resume_uri": resume,
                           "hooks": options.hooks,
                           "startup": options.startup,
                           # a quiet console: each worker's output goes to a file in this
                           # (local) folder instead of the driver's console
                           "log_dir": options.log_dir,
                           # identifies this fit's checkpoints for a restart (checkpoint.py)
                           "session": uuid.uuid4().hex},
        torch_config=TorchConfig(backend=job.backend),
        datasets=datasets,
        **ray_configs(job, out, options.ray_callbacks),
    )
    if options.log_dir is None:
        trainer.fit()
    else:
        from bigopt.console import MetricsFollower

        with MetricsFollower(out, job.spec.train.max_steps, desc=out.name):
            trainer.fit()
    from bigopt.train.results import read_result_artifact

    return read_result_artifact(out)


def warn_if_readers_starve(job: ResolvedJob) -> None:
    """Streaming reads run as Ray tasks beside the training workers: on a cluster whose CPUs
    the workers take in full, nothing can read and the run waits forever (an autoscaling
    cluster adds nodes instead, so this is a warning, not an error)."""
    import ray

    c = job.spec.cluster
    need, have = c.num_workers * c.cpus_per_worker, ray.cluster_resources().get("CPU", 0)
    if have < need + 1:
        log.warning("train.data_order: streaming reads need a CPU beside the training workers, "
                    "but cluster.num_workers x cluster.cpus_per_worker = %g of the cluster's %g "
                    "CPUs leaves none: unless the cluster autoscales, lower them or use "
                    "data_order: deterministic (reads before training starts)", need, have)


def resume_uri(out: RunDir, checkpoint: str | None) -> str | None:
    """A checkpoint as a URI workers can open: paths found inside an S3 run dir get s3://."""
    if checkpoint is None or "://" in checkpoint or out.is_local:
        return checkpoint
    return "s3://" + checkpoint


def ray_train_entry(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: Ray's context in, ``loop.train`` called with it."""
    import logging

    import ray.train
    import ray.train.torch

    ray_ctx = ray.train.get_context()
    out = RunDir(config["run_uri"])  # the stage folder
    if config.get("log_dir"):  # first, so import-time warnings land in the file too
        from bigopt.console import redirect_worker_output

        redirect_worker_output(f"{config['log_dir']}/{out.name}-rank{ray_ctx.get_world_rank()}.log")
    # Imported on the worker, so DeepSpeed is never imported in the driver.
    from bigopt.train.loop import TrainContext, train
    from bigopt.train.reporting import RayTrainReporter

    logging.basicConfig(level=logging.INFO, format="%(asctime)s bigopt %(message)s", force=True)
    job = ResolvedJob.model_validate(config["job"])  # the boundary dict becomes typed first
    data = DataArtifact.model_validate(config["data"])
    splits = config["splits"]
    ctx = TrainContext(rank=ray_ctx.get_world_rank(), world_size=ray_ctx.get_world_size(),
                       device=ray.train.torch.get_device(),
                       train_data=splits.get("train") or ray.train.get_dataset_shard("train"),
                       val_data=splits["val"], test_data=splits.get("test"),
                       session=config.get("session"), resume_uri=config.get("resume_uri"),
                       startup=config.get("startup"))
    train(job, data, out, ctx, RayTrainReporter(out), config.get("hooks"))


def report_section(out: RunDir, artifact: ModelArtifact) -> list[str]:
    from bigopt.report import train_section

    return train_section(out, artifact)
