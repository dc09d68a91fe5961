"""How a trainer hands metrics and checkpoints to whoever runs it.

The trainer never reads Ray globals: its caller gives it a ``Reporter``.

* ``RayTrainReporter``: under Ray Train. ``ray.train.report`` uploads each rank's files into
  ``<stage>/checkpoints/step_N`` and Ray registers them; validation metrics are reported at
  every eval (Tune schedulers see them when a ``TorchTrainer`` runs inside a trial).
* ``LocalReporter``: one process (a small Tune trial, a script): checkpoints are copied to
  ``<stage>/checkpoints/step_N`` by bigopt itself, ``keep_last`` applies.
* ``TuneReporter``: a ``LocalReporter`` that also calls ``tune.report`` with the copy, so ASHA
  and PBT see every eval and PBT's exploit restores from it (``tune.get_checkpoint``).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from bigopt.runtime import RunDir
from bigopt.train.layout import CHECKPOINTS, step_of

log = logging.getLogger("bigopt")


class Reporter(Protocol):
    #: the stage folder whose checkpoints/ holds the checkpoints this reporter persists
    run: RunDir

    def report(self, metrics: dict[str, Any], *, checkpoint_dir: str | None = None,
               checkpoint_name: str | None = None) -> None: ...

    def get_checkpoint(self) -> Any: ...

    def register(self, checkpoint: Any, step: int) -> None: ...


class RayTrainReporter:
    def __init__(self, run: RunDir):
        self.run = run

    def report(self, metrics: dict[str, Any], *, checkpoint_dir: str | None = None,
               checkpoint_name: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name)

    def get_checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def register(self, checkpoint: Any, step: int) -> None:
        """Hand a checkpoint already in Ray's storage to Ray (no copy), so it becomes the one a
        later restart starts from and ``keep_last`` deletes it in turn (no orphan).

        Ray takes it only on its own storage filesystem (compared with ``==``: one this worker
        builds from its own environment can differ from the driver's, which Ray was given;
        seen with the driver on another S3 endpoint) and inside its storage path. A report Ray
        refuses raises after Ray counted it, and every later report then waits forever for it
        (Ray 2.60, ``_wait_then_report``): so the checkpoint is handed over on Ray's own
        filesystem, and one outside Ray's storage is not handed over at all."""
        import ray.train

        storage = ray.train.get_context().get_storage()
        root = storage.experiment_fs_path.rstrip("/") + "/"
        if not checkpoint.path.startswith(root):
            log.warning("not registering %s with Ray Train: outside its storage %s",
                        checkpoint.path, root)
            return
        ours = ray.train.Checkpoint(checkpoint.path, filesystem=storage.storage_filesystem)
        ray.train.report({"step": step}, checkpoint=ours,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


class LocalReporter:
    def __init__(self, run: RunDir, *, keep_last: int = 2):
        self.run, self.keep_last = run, keep_last
        self.reported: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any], *, checkpoint_dir: str | None = None,
               checkpoint_name: str | None = None) -> None:
        self.reported.append(dict(metrics))
        if checkpoint_dir:
            self._persist(checkpoint_dir, checkpoint_name or "checkpoint")

    def _persist(self, local_dir: str, name: str) -> Any:
        import pyarrow.fs as pafs
        from ray.train import Checkpoint

        target = self.run.sub(f"{CHECKPOINTS}/{name}")
        self.run.fs.create_dir(target, recursive=True)
        pafs.copy_files(local_dir, target, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.run.fs)
        self._prune(keep=name)
        return Checkpoint(target, filesystem=self.run.fs)

    def _prune(self, keep: str) -> None:
        # checkpoint directory names: the first component below checkpoints/
        found = sorted({p.split("/")[1] for p in self.run.list(CHECKPOINTS) if p.count("/") >= 2},
                       key=step_of)
        stale = [n for n in found if n != keep][: max(0, len(found) - self.keep_last)]
        for name in stale:
            self.run.fs.delete_dir(self.run.sub(f"{CHECKPOINTS}/{name}"))

    def get_checkpoint(self) -> Any:
        return None

    def register(self, checkpoint: Any, step: int) -> None:
        pass


class TuneReporter(LocalReporter):
    def report(self, metrics: dict[str, Any], *, checkpoint_dir: str | None = None,
               checkpoint_name: str | None = None) -> None:
        from ray import tune

        self.reported.append(dict(metrics))
        checkpoint = None
        if checkpoint_dir:
            checkpoint = self._persist(checkpoint_dir, checkpoint_name or "checkpoint")
        # the trial's own run dir (this reporter writes in its train/ folder) travels with every
        # result: trials.parquet lists it
        tune.report({**metrics, "trial_run": self.run.parent.uri}, checkpoint=checkpoint)

    def get_checkpoint(self) -> Any:
        from ray import tune

        return tune.get_checkpoint()
