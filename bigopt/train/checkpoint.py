"""Checkpointing as a component.

The loop calls ``save(step, last=...)`` on every step; the manager decides (``checkpoint_every``,
last step). Every rank writes its own shard with DeepSpeed's ``save_checkpoint`` into a local
staging dir and reports it to Ray Train, which merges the ranks' files into one checkpoint
under ``<run>/train/checkpoints/step_NNNNNN`` (local or S3) and keeps ``keep_last`` of them.
Guarding the save with ``rank == 0`` would hang: DeepSpeed's save has collectives inside.

``load()`` resumes from ``ray.train.get_checkpoint()``: the latest registered checkpoint after
a worker-group restart, or the one the driver passed as ``resume_from_checkpoint``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Protocol

log = logging.getLogger("bigopt")

STATE_FILE = "bigopt_state.json"


class Checkpointable(Protocol):
    def save_checkpoint(self, directory: str) -> None: ...
    def load_checkpoint(self, directory: str) -> None: ...


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:06d}"


class CheckpointManager:
    def __init__(self, engine: Checkpointable, *, every: int, world_rank: int,
                 at: list[int] | None = None):
        self.engine, self.every, self.world_rank = engine, every, world_rank
        self.at = set(at or ())

    def should_save(self, step: int, last: bool) -> bool:
        return last or step in self.at or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, Any], *,
             last: bool = False) -> bool:
        """Save on all ranks and report to Ray Train; returns whether a checkpoint was made."""
        import ray.train

        if not self.should_save(step, last):
            return False
        staging = tempfile.mkdtemp(prefix=f"bigopt-ckpt-{step}-r{self.world_rank}-")
        try:
            self.engine.save_checkpoint(staging)
            if self.world_rank == 0:
                with open(os.path.join(staging, STATE_FILE), "w") as f:
                    json.dump(state, f)
            ray.train.report(
                {**metrics, "step": step},
                checkpoint=ray.train.Checkpoint.from_directory(staging),
                checkpoint_dir_name=checkpoint_dir_name(step),
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return True

    def load(self, resume_uri: str | None = None) -> dict[str, Any] | None:
        """Restore the engine; returns the trainer state, or None on a fresh start.

        Ray's own checkpoint (the latest one this run registered, after a worker-group
        restart) wins over ``resume_uri`` (an explicit ``--resume``), which only seeds the
        first attempt. Ray 2.60 deprecates TorchTrainer(resume_from_checkpoint=...), hence
        the URI travels in the loop config.
        """
        import ray.train

        from bigopt.runtime import filesystem_for

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and resume_uri:
            fs, path = filesystem_for(resume_uri)
            checkpoint = ray.train.Checkpoint(path, filesystem=fs)
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            self.engine.load_checkpoint(directory)
            with open(os.path.join(directory, STATE_FILE)) as f:
                state = json.load(f)
        log.info("resumed from %s at step %d", checkpoint.path, state["step"])
        return state
