"""Typed artifacts: what one stage hands the next, as ``<run>/<stage>/artifact.json``.

A stage reads its inputs from artifacts only (never by path convention), so any input can come
from another run (``--from data=RUN_DIR``): the artifact carries absolute URIs. Every artifact
carries its lineage (``parent``: the artifact.json it was made from). Kinds register
themselves by subclassing ``Artifact`` with a ``kind`` literal: a new kind is one class.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from bigopt.runtime import RunDir

ARTIFACT_FILE = "artifact.json"

#: kind -> class, filled by ``Artifact.__init_subclass__``
ARTIFACT_KINDS: dict[str, type[Artifact]] = {}


class Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    #: the stage that wrote it and the run dir it lives in
    stage: str
    run: str
    #: where the artifact's payload is (a directory URI: local path or s3://)
    uri: str
    #: lineage: the artifact.json (URI) this one was made from; None for a first stage
    parent: str | None = None
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())

    #: the ``kind`` value of a registered subclass
    KIND: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("KIND")
        if kind:
            ARTIFACT_KINDS[kind] = cls

    @property
    def artifact_uri(self) -> str:
        """URI of this artifact's own ``artifact.json`` (what a child names as ``parent``): it
        sits in the artifact's folder, ``uri``."""
        return f"{self.uri.rstrip('/')}/{ARTIFACT_FILE}"


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    uri: str
    rows: int


class DataArtifact(Artifact):
    KIND: ClassVar[str] = "data"
    kind: Literal["data"] = "data"
    manifest: str  # URI of manifest.json
    #: content hash of the source, the data spec and the context: equal fingerprints, equal shards
    fingerprint: str
    task: str
    columns: tuple[str, str]
    context: int | None = None
    tokenizer: dict[str, Any] = Field(default_factory=dict)
    splits: dict[str, SplitInfo]

    @property
    def artifact_uri(self) -> str:
        """The data stage's own ``artifact.json``: on a cache hit ``uri`` (the shards) is the
        cache entry, while the artifact is written in the run's stage folder."""
        return f"{self.run.rstrip('/')}/{self.stage}/{ARTIFACT_FILE}"


class ModelArtifact(Artifact):
    """A model anyone can load: ``bigopt.load_model`` rebuilds it from ``arch`` and ``weights``
    (consolidated safetensors: no DeepSpeed, no pickle); ``checkpoint`` is the engine state to
    resume training from (DeepSpeed's or DDP's files, any ZeRO stage or pipeline)."""

    KIND: ClassVar[str] = "model"
    kind: Literal["model"] = "model"
    task: str
    #: ``bigopt.models.from_arch`` rebuilds the model from it
    arch: dict[str, Any]
    #: how ``checkpoint`` stores the engine state
    format: Literal["deepspeed", "ddp", "none"]
    step: int
    #: URI of ``model.safetensors``: the consolidated fp32 weights (all ZeRO-3 / pipeline ranks)
    weights: str | None = None
    #: URI of the engine checkpoint directory (resume), None for a model with no engine state
    checkpoint: str | None = None
    #: conversions applied after loading the weights, in order (e.g. int8 quantization, which
    #: is a recipe over fp32 weights here, not a second weights format)
    transforms: list[dict[str, Any]] = Field(default_factory=list)
    #: a compress stage's variant name ("prune", "prune+distill", ...); None for train's model
    variant: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    #: parameter count, size on disk (bytes) and CPU latency (ms), when measured
    params: int | None = None
    size_bytes: int | None = None
    latency_ms: dict[str, Any] = Field(default_factory=dict)
    #: other model artifacts this stage produced (a compress stage's variants), by URI
    variants: list[str] = Field(default_factory=list)


class SearchArtifact(Artifact):
    KIND: ClassVar[str] = "search"
    kind: Literal["search"] = "search"
    best_config: dict[str, Any]
    trials: str  # URI of the trials table
    metric: str
    mode: Literal["min", "max"]


class ExportArtifact(Artifact):
    """Exported files (ONNX, int8 ONNX, ExecuTorch ``.pte``), each with its ``model_card.json``."""

    KIND: ClassVar[str] = "export"
    kind: Literal["export"] = "export"
    task: str
    #: one entry per exported file: {"file", "format", "card", "bytes", "variant", ...}
    files: list[dict[str, Any]]
    #: the variant the spec's budget picks (``export.budget``), when one was given
    chosen: str | None = None


def parse_artifact(data: dict[str, Any]) -> Artifact:
    kind = data.get("kind")
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; known: {', '.join(sorted(ARTIFACT_KINDS))}")
    return ARTIFACT_KINDS[kind].model_validate(data)


def write_artifact(out: RunDir, artifact: Artifact) -> None:
    """Write ``artifact`` as ``artifact.json`` in ``out`` (a stage's own folder)."""
    out.write_text(ARTIFACT_FILE, artifact.model_dump_json(indent=2) + "\n")


def read_artifact(run: RunDir, stage: str) -> Artifact:
    """The artifact ``stage`` wrote in ``run``; FileNotFoundError naming both if there is none."""
    rel = f"{stage}/{ARTIFACT_FILE}"
    if not run.exists(rel):
        raise FileNotFoundError(f"{run.uri} has no {rel}: run the {stage} stage there first")
    return parse_artifact(run.read_json(rel))


def read_artifact_at(uri: str) -> Artifact:
    """The artifact in the folder ``uri`` (or the ``artifact.json`` file itself)."""
    folder = uri[: -len(ARTIFACT_FILE) - 1] if uri.endswith("/" + ARTIFACT_FILE) else uri.rstrip("/")
    where = RunDir(folder)
    if not where.exists(ARTIFACT_FILE):
        raise FileNotFoundError(f"no {ARTIFACT_FILE} in {folder}")
    return parse_artifact(where.read_json(ARTIFACT_FILE))


def ancestor(artifact: Artifact, kind: str, *, max_depth: int = 16) -> Artifact | None:
    """The nearest artifact of ``kind`` that ``artifact`` was made from (its ``parent`` chain);
    None when the chain ends, breaks (moved or deleted) or holds none."""
    seen = 0
    while artifact.parent and seen < max_depth:
        try:
            artifact = read_artifact_at(artifact.parent)
        except (FileNotFoundError, OSError, ValueError):
            return None
        if artifact.kind == kind:
            return artifact
        seen += 1
    return None


def has_artifact(run: RunDir, stage: str) -> bool:
    return run.exists(f"{stage}/{ARTIFACT_FILE}")
