"""Checkpointing as a component.

The loop calls ``save(step, last=...)`` on every step; the manager decides (``checkpoint_every``,
last step). Every rank writes its own shard with DeepSpeed's ``save_checkpoint`` into a local
staging dir and hands it to its ``Reporter`` (``bigopt.train.reporting``): under Ray Train,
Ray merges the ranks' files into one checkpoint under ``<stage>/checkpoints/step_NNNNNN``
(local or S3) and keeps ``keep_last`` of them; in one process bigopt copies it there itself.
Guarding the save with ``rank == 0`` would hang: DeepSpeed's save has collectives inside.

Ray registers a checkpoint only when its controller next polls the workers, so a worker that
dies after every rank has uploaded step N but before that poll makes Ray restart from the
checkpoint before N: up to two intervals repeated (seen on a loaded CI machine). So after
``report`` returns on every rank (a barrier), rank 0 marks the directory complete with this
run session's id (``COMPLETE_FILE``), and ``load()`` takes the newest of Ray's checkpoint,
the explicit resume one, and this session's newest complete one on storage (which it then
registers with Ray, without copying, so ``keep_last`` still applies to it). Each rank also
saves its RNG state, so dropout continues the same stream after a resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Protocol

import torch

from bigopt.train.layout import (
    COMPLETE_FILE,
    STATE_FILE,
    checkpoint_dir_name,
    checkpoint_rel,
    complete_checkpoints,
    step_of,
)

if TYPE_CHECKING:
    from bigopt.train.reporting import Reporter

log = logging.getLogger("bigopt")



class Checkpointable(Protocol):
    def save_checkpoint(self, directory: str) -> None: ...
    def load_checkpoint(self, directory: str) -> None: ...


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    """This process's torch generators (dropout); tensors only, so loadable with weights_only."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, engine: Checkpointable, reporter: Reporter, *, every: int, world_rank: int,
                 at: list[int] | None = None, session: str | None = None):
        self.engine, self.reporter, self.every, self.world_rank = engine, reporter, every, world_rank
        self.at = set(at or ())
        # run: the stage folder where checkpoints and completion markers land; session: whose markers count
        # on a restart (None: only the reporter's own checkpoint, e.g. PBT's exploit target)
        self.run, self.session = reporter.run, session
        self.last_saved: int | None = None
        self.loaded_from: str | None = None  # the checkpoint ``load`` restored, if any

    def should_save(self, step: int, last: bool) -> bool:
        return last or step in self.at or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, Any], *,
             last: bool = False) -> bool:
        """Save on all ranks and report it with ``metrics``; returns whether one was made."""
        if not self.should_save(step, last):
            return False
        staging = tempfile.mkdtemp(prefix=f"bigopt-ckpt-{step}-r{self.world_rank}-")
        try:
            self.engine.save_checkpoint(staging)
            # Ray merges every rank's files into one directory: one RNG file per rank.
            torch.save(rng_state(), os.path.join(staging, rng_file(self.world_rank)))
            if self.world_rank == 0:
                with open(os.path.join(staging, STATE_FILE), "w") as f:
                    json.dump(state, f)
            self.reporter.report({**metrics, "step": step}, checkpoint_dir=staging,
                                 checkpoint_name=checkpoint_dir_name(step))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._mark_complete(step)
        self.last_saved = step
        return True

    def uri_of(self, step: int) -> str:
        return self.run.uri_of(checkpoint_rel(step))

    def _mark_complete(self, step: int) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's synchronous upload has returned
        if self.world_rank == 0:
            self.run.write_json(f"{checkpoint_rel(step)}/{COMPLETE_FILE}",
                                {"step": step, "session": self.session})

    def load(self, resume_uri: str | None = None) -> dict[str, Any] | None:
        """Restore the engine; returns the trainer state, or None on a fresh start.

        The reporter's checkpoint (the latest one Ray registered, after a worker-group
        restart; PBT's exploit target in a Tune trial) wins over ``resume_uri`` (an explicit
        ``--resume``), which only seeds the first attempt. Ray 2.60 deprecates
        TorchTrainer(resume_from_checkpoint=...), hence the URI travels in the loop config.
        """
        import ray.train

        from bigopt.runtime import filesystem_for

        checkpoint = self.reporter.get_checkpoint()
        if checkpoint is None and resume_uri:
            fs, path = filesystem_for(resume_uri)
            checkpoint = ray.train.Checkpoint(path, filesystem=fs)
        own = complete_checkpoints(self.run, self.session) if self.session else []
        unregistered = bool(own) and (checkpoint is None or step_of(own[-1]) > step_of(checkpoint.path))
        if unregistered:
            # written by this session after the one Ray registered: Ray had not polled yet
            log.info("resuming from %s, newer than Ray's registered %s", own[-1],
                     checkpoint.path if checkpoint else None)
            checkpoint = ray.train.Checkpoint(own[-1], filesystem=self.run.fs)
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            self.engine.load_checkpoint(directory)
            rng_path = os.path.join(directory, rng_file(self.world_rank))
            if os.path.exists(rng_path):
                set_rng_state(torch.load(rng_path, weights_only=True))
            else:  # e.g. resumed with more workers than saved it: dropout draws differ
                log.warning("no RNG state for rank %d in %s", self.world_rank, checkpoint.path)
            with open(os.path.join(directory, STATE_FILE)) as f:
                state = json.load(f)
        log.info("resumed from %s at step %d", checkpoint.path, state["step"])
        self.loaded_from = checkpoint.path
        if unregistered:
            self.reporter.register(checkpoint, state["step"])
        return state
