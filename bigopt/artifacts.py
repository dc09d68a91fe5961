"""Typed artifacts: what one stage hands the next, as ``<run>/<stage>/artifact.json``.

A stage reads its inputs from artifacts only (never by path convention), so any input can come
from another run (``--from data=RUN_DIR``): the artifact carries absolute URIs.
"""

from __future__ import annotations

import datetime as _dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bigopt.runtime import RunDir

ARTIFACT_FILE = "artifact.json"


class Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    #: the stage that wrote it and the run dir it lives in
    stage: str
    run: str
    #: where the artifact's payload is (a directory URI: local path or s3://)
    uri: str
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    uri: str
    rows: int


class DataArtifact(Artifact):
    kind: Literal["data"] = "data"
    manifest: str  # URI of manifest.json
    #: content hash of the source, the data spec and the context: equal fingerprints, equal shards
    fingerprint: str
    task: str
    columns: tuple[str, str]
    context: int | None = None
    tokenizer: dict[str, Any] = Field(default_factory=dict)
    splits: dict[str, SplitInfo]


class ModelArtifact(Artifact):
    kind: Literal["model"] = "model"
    task: str
    #: ``bigopt.models.from_arch`` rebuilds the model from it
    arch: dict[str, Any]
    #: how ``uri`` stores the weights: a DeepSpeed checkpoint (any ZeRO stage or pipeline) or DDP's
    format: Literal["deepspeed", "ddp"]
    step: int
    metrics: dict[str, Any] = Field(default_factory=dict)


class SearchArtifact(Artifact):
    kind: Literal["search"] = "search"
    best_config: dict[str, Any]
    trials: str  # URI of the trials table
    metric: str
    mode: Literal["min", "max"]


AnyArtifact = Annotated[DataArtifact | ModelArtifact | SearchArtifact, Field(discriminator="kind")]


class _Envelope(BaseModel):
    artifact: AnyArtifact


def write_artifact(run: RunDir, artifact: Artifact) -> None:
    run.write_text(f"{artifact.stage}/{ARTIFACT_FILE}", artifact.model_dump_json(indent=2) + "\n")


def read_artifact(run: RunDir, stage: str) -> Artifact:
    """The artifact ``stage`` wrote in ``run``; FileNotFoundError naming both if there is none."""
    rel = f"{stage}/{ARTIFACT_FILE}"
    if not run.exists(rel):
        raise FileNotFoundError(f"{run.uri} has no {rel}: run the {stage} stage there first")
    return _Envelope.model_validate({"artifact": run.read_json(rel)}).artifact


def has_artifact(run: RunDir, stage: str) -> bool:
    return run.exists(f"{stage}/{ARTIFACT_FILE}")
