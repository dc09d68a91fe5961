"""The trainer inside a Ray Tune trial: a search stage's trials train with bigopt's own loop.

Small trials (``cluster.num_workers: 1``) run in the trial's own process, with a one-rank
process group; large ones run a ``TorchTrainer`` inside the trial, whose reports reach Tune
through Ray's ``TuneReportCallback``. Either way every eval's ``val_loss`` reaches Tune's
scheduler (ASHA stops on it, PBT exploits on it), each trial writes its own run dir, and all
trials read one prepared data artifact.
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
            from ray.tune.integration.ray_train import TuneReportCallback

            from bigopt.train.stage import train_stage

            train_stage(job, {"data": data}, out,
                        StageOptions(hooks=hooks, ray_callbacks=[TuneReportCallback()]))

    return trainable
