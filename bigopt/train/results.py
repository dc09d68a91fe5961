"""What a finished fit leaves in its stage folder: ``result.json``, ``model.safetensors`` (the
consolidated fp32 weights, gathered across ZeRO-3 and pipeline ranks) and the model artifact.

Rank 0 writes; every rank returns the same artifact. The driver of a Ray Train fit reads the
artifact back from ``result.json`` (workers return nothing to it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bigopt.artifacts import ModelArtifact
from bigopt.train.layout import WEIGHTS_FILE

if TYPE_CHECKING:
    from bigopt.train.loop import Trainer, TrainResult

RESULT_FILE = "result.json"


def write_result(trainer: Trainer, fit: TrainResult, test: dict[str, Any]) -> ModelArtifact:
    job, out = trainer.job, trainer.run
    step = trainer.checkpointer.last_saved
    assert step is not None  # the last step always checkpoints
    last_val = {"val_loss": fit.val_losses[max(fit.val_losses)]} if fit.val_losses else {}
    checkpoint = trainer.checkpointer.uri_of(step)
    artifact = ModelArtifact(
        stage=out.name, run=out.parent.uri, uri=out.uri, task=job.task, arch=job.arch or {},
        format="deepspeed" if job.spec.train.strategy == "deepspeed" else "ddp", step=step,
        checkpoint=checkpoint, weights=out.uri_of(WEIGHTS_FILE),
        params=int(trainer.engine_facts()["params_total"]),
        metrics={"final_loss": fit.final_loss, **last_val,
                 **trainer.val_metrics.get(max(trainer.val_metrics, default=-1), {}), **test})
    if trainer.rank == 0:
        from bigopt.train.weights import consolidate_checkpoint

        consolidate_checkpoint(out, job.arch or {}, checkpoint, finalize=trainer.hooks.finalize_state)
        out.write_json(RESULT_FILE, {**trainer.result(fit), **test,
                                     "artifact": artifact.model_dump(mode="json")})
    return artifact


def read_result_artifact(out: Any) -> ModelArtifact:
    """The model artifact rank 0 recorded in ``out``'s ``result.json`` (the driver's side)."""
    return ModelArtifact.model_validate(out.read_json(RESULT_FILE)["artifact"])
