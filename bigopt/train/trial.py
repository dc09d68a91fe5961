"""The trainer inside a Ray Tune trial: a search stage's trials train with bigopt's own loop.

Small trials (``cluster.num_workers: 1``) run in the trial's own process, with a one-rank
process group; large ones run a ``TorchTrainer`` inside the trial. Either way every eval's
``val_loss`` reaches Tune's scheduler (ASHA stops on it, PBT and PB2 exploit on it) together
with the checkpoint taken at that step, each trial writes its own run dir, and all trials read
one prepared data artifact.

PBT's exploit restarts a trial from the donor's checkpoint (``tune.get_checkpoint()``): the
one-worker trial loads it in its process; the multi-worker trial hands it to its TorchTrainer as
the checkpoint to resume from. Ray's own ``TuneReportCallback`` forwards a TorchTrainer's
metrics to Tune without the checkpoint (only its path, as a metric), which would leave PBT
nothing to copy; ``CheckpointRelay`` forwards both.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from bigopt.artifacts import DataArtifact, ModelArtifact
from bigopt.resolve import ResolvedJob, resolve
from bigopt.runtime import RunDir
from bigopt.spec import JobSpec, with_values
from bigopt.stages import StageOptions
from bigopt.train.hooks import TrainHooks
from bigopt.train.reporting import Reporter


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_in_process(job: ResolvedJob, data: DataArtifact, out: RunDir, reporter: Reporter, *,
                     hooks: TrainHooks | None = None, resume_uri: str | None = None) -> ModelArtifact:
    """Run the trainer in this process as a world of one rank, into the stage folder ``out``."""
    import torch
    import torch.distributed as dist

    from bigopt.train.loop import TrainContext, train
    from bigopt.train.stage import plan_splits

    created = not dist.is_initialized()
    if created:
        # DeepSpeed and the loop's all-reduces need a process group, even of one rank.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                          LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        # the test split, when there is one, is evaluated after the last step into result.json
        # only: searchers and schedulers see validation metrics, never test ones
        splits = plan_splits(job, data, test=True)
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        ctx = TrainContext(rank=0, world_size=1, device=device, train_data=splits["train"],
                           val_data=splits["val"], test_data=splits.get("test"), session=None,
                           resume_uri=resume_uri)
        return train(job, data, out, ctx, reporter, hooks)
    finally:
        if created:
            dist.destroy_process_group()


#: the key under which ``CheckpointRelay`` passes a report's checkpoint folder name
CHECKPOINT_NAME_KEY = "__bigopt_checkpoint__"


def _relay_callback(queue: Any) -> Any:
    """A Ray Train callback (it runs in the TorchTrainer's controller) that puts each report's
    metrics, and the name of the checkpoint folder it persisted, on ``queue``."""
    from ray.train.v2.api.callback import UserCallback

    class CheckpointRelay(UserCallback):
        def __init__(self, queue: Any):
            self.queue = queue

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                         checkpoint: Any) -> None:
            item = dict(metrics[0])  # rank 0's metrics: the ones bigopt's trainer reports
            if checkpoint is not None:
                item[CHECKPOINT_NAME_KEY] = os.path.basename(checkpoint.path.rstrip("/"))
            self.queue.put(item)

    return CheckpointRelay(queue)


def checkpoint_uri(checkpoint: Any) -> str:
    """A Ray checkpoint's location as bigopt URIs are written (a path, or ``s3://...``)."""
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.S3FileSystem):
        return "s3://" + checkpoint.path.lstrip("/")
    return checkpoint.path


def train_with_workers(job: ResolvedJob, data: DataArtifact, out: RunDir, *,
                       hooks: TrainHooks | None, resume_uri: str | None) -> None:
    """Run a TorchTrainer for the trial and report each of its results to Tune with its
    checkpoint, from the trial's own thread (``tune.report`` is the trial session's)."""
    import queue as queue_module
    import threading

    import ray.train
    from ray import tune
    from ray.util.queue import Empty, Queue

    from bigopt.train.layout import CHECKPOINTS
    from bigopt.train.stage import train_stage

    relay = Queue(actor_options={"num_cpus": 0})
    failure: queue_module.SimpleQueue[BaseException] = queue_module.SimpleQueue()

    def fit() -> None:
        try:
            # trust_checkpoint: the resume point is this search's own trial checkpoint (PBT's
            # donor), not a file from outside the run
            train_stage(job, {"data": data}, out,
                        StageOptions(hooks=hooks, ray_callbacks=[_relay_callback(relay)],
                                     resume=resume_uri, trust_checkpoint=resume_uri is not None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the trial's thread
            failure.put(exc)

    def forward(item: dict[str, Any]) -> None:
        name = item.pop(CHECKPOINT_NAME_KEY, None)
        checkpoint = (ray.train.Checkpoint(out.sub(f"{CHECKPOINTS}/{name}"), filesystem=out.fs)
                      if name else None)
        tune.report({**item, "trial_run": out.parent.uri}, checkpoint=checkpoint)

    worker = threading.Thread(target=fit, name="bigopt-trial-fit", daemon=True)
    worker.start()
    while worker.is_alive():
        try:
            forward(relay.get(timeout=0.5))
        except Empty:
            pass
    while not relay.empty():
        forward(relay.get())
    if not failure.empty():
        raise failure.get()


def tune_trainable(spec: JobSpec, data: DataArtifact, *, hooks: TrainHooks | None = None,
                   to_values: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                   trials_dir: str | None = None) -> Callable[[dict[str, Any]], None]:
    """A Tune function trainable: ``config`` holds spec paths (``{"train.lr": 3e-4}``) applied
    to ``spec`` (after ``to_values``, which e.g. turns architecture decisions into a model
    section); the trial trains on ``data`` into a run dir of its own under ``trials_dir``
    (``<trials_dir>/trials/<id>``; default ``<storage>/<name>-trials/<id>``), training into its
    ``train/`` folder."""

    def trainable(config: dict[str, Any]) -> None:
        from bigopt.train.reporting import TuneReporter

        job = resolve(with_values(spec, to_values(config) if to_values else config))
        trial = (RunDir.create(trials_dir, "trials") if trials_dir
                 else RunDir.create(job.spec.storage, f"{job.spec.name}-trials"))
        trial.write_text("resolved.json", job.dumps())
        out = trial.stage("train")  # a trial is a run dir of its own, with a train stage
        assert job.spec.train is not None
        if job.spec.cluster.num_workers == 1:
            train_in_process(job, data, out, TuneReporter(out, keep_last=job.spec.train.keep_last),
                             hooks=hooks)
        else:
            from ray import tune

            donor = tune.get_checkpoint()  # set when PBT/PB2 exploited another trial
            train_with_workers(job, data, out, hooks=hooks,
                               resume_uri=checkpoint_uri(donor) if donor is not None else None)

    return trainable
