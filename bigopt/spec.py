"""The typed job spec: the single source of configuration for a bigopt run.

One pydantic model per YAML section. Precedence is ``--set`` > YAML > defaults. Unknown keys
are errors (``extra="forbid"``) because a misspelt key that is silently ignored trains the
wrong model for hours. ``load_spec`` collects *every* problem and raises one ``SpecError`` whose
lines read ``field.path: message``, so ``bigopt validate`` can print them without starting Ray.

This module holds the top level (``JobSpec``), the cluster and model sections, loading and
``--set``; each stage's own section lives beside its stage (``bigopt/<stage>/spec.py``) and is
re-exported here. None of them imports anything heavy (no torch, Ray or DeepSpeed): every
other module depends on the spec, not the reverse. Everything *derived* from a spec (task,
context, architecture, layout, precision, DeepSpeed config) is decided once, by
``bigopt.resolve.resolve``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError

# Each stage's section lives beside its stage (its fields, defaults and rules); re-exported
# here, where a whole spec is read.
from bigopt.data.spec import (  # noqa: I001
    FASHION_MNIST_DIR,
    IMAGE_SOURCES,
    SOURCE_TAGS,
    STEP_KINDS,
    TEXT_SOURCES,
    AugmentSpec,
    DataSpec,
    ExactDedupStep,
    IdxSource,
    ImageFolderSource,
    ImageSource,
    IncompleteStep,
    LabelStep,
    NearDedupStep,
    NoiseStep,
    SplitSpec,
    TableSource,
    TextTreeSource,
)
from bigopt.presets import GPT_PRESETS
from bigopt.search.spec import ArchSpaceSpec, SearchSpec, domain_problem, search_problems
from bigopt.sections import Section, SpecError
from bigopt.train.spec import (
    DEFAULT_MAX_FAILURES,
    FP16Spec,
    PipelineSpec,
    ScheduleSpec,
    TrainSpec,
    ZeroSpec,
    layout_problems,
)

__all__ = [
    "DEFAULT_MAX_FAILURES", "FASHION_MNIST_DIR", "IMAGE_SOURCES", "SOURCE_TAGS", "STEP_KINDS",
    "TEXT_SOURCES", "ArchSpaceSpec", "AugmentSpec", "CNNModelSpec", "ClusterSpec", "CompressSpec",
    "DataSpec", "ExactDedupStep", "ExportSpec", "FP16Spec", "GPTModelSpec", "IdxSource",
    "ImageFolderSource", "ImageSource", "IncompleteStep", "JobSpec", "LabelStep", "MLPModelSpec",
    "NearDedupStep", "NoiseStep", "PipelineSpec", "ScheduleSpec", "SearchSpec", "Section",
    "SpecError", "SplitSpec", "TableSource", "TextTreeSource", "TrainSpec", "ZeroSpec",
    "apply_overrides", "cross_field_problems", "domain_problem", "dump_spec", "layout_problems",
    "load_spec", "parse_model_section", "parse_spec", "search_problems", "with_values",
]


# --------------------------------------------------------------------------- cluster
class ClusterSpec(Section):
    address: str | None = Field(
        None,
        description="Ray address. null: RAY_ADDRESS or a running cluster, else an embedded "
        "local Ray bound to 127.0.0.1.",
    )
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data x pipeline ranks).")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement-group strategy for the training workers."
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of an embedded local Ray (null: all of this machine's)."
    )


# --------------------------------------------------------------------------- model
class GPTModelSpec(Section):
    kind: Literal["gpt"]
    # the names come from the one preset table
    preset: Literal[tuple(GPT_PRESETS)] | None = Field(  # type: ignore[valid-type]
        None, description="A named size (bigopt.presets.GPT_PRESETS); fields set explicitly "
        "override it, the rest (context included) come from the preset.")
    vocab_size: int = Field(256, ge=2)
    context: int = Field(256, ge=8)
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    d_model: int = Field(128, ge=8)
    dropout: float = Field(0.0, ge=0, lt=1)

    def config(self) -> dict[str, Any]:
        """Constructor arguments: the preset, overridden by every field set explicitly."""
        cfg = self.model_dump(exclude={"kind", "preset"})
        if self.preset:
            explicit = self.model_dump(exclude_unset=True, exclude={"kind", "preset"})
            cfg = {**cfg, **GPT_PRESETS[self.preset], **explicit}
        return cfg


class CNNModelSpec(Section):
    kind: Literal["cnn"]
    in_channels: int = Field(1, ge=1)
    num_classes: int = Field(10, ge=2)
    image_size: int = Field(28, ge=4)
    stem_channels: int = Field(32, ge=1)
    blocks: list[dict[str, Any]] | None = None


class MLPModelSpec(Section):
    kind: Literal["mlp"]
    in_features: int = Field(64, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [128, 128])
    num_classes: int = Field(10, ge=2)
    dropout: float = Field(0.0, ge=0, lt=1)


ModelSpec = Annotated[GPTModelSpec | CNNModelSpec | MLPModelSpec, Field(discriminator="kind")]


# --------------------------------------------------------------------------- job
from bigopt.compress.spec import COMPRESS_STEP_KINDS, CompressSpec  # noqa: E402
from bigopt.export.spec import ExportSpec  # noqa: E402
from bigopt.report.spec import ReportSpec  # noqa: E402


def parse_model_section(raw: Any) -> ModelSpec:
    """A model section given as a dict elsewhere in a spec (a distillation student)."""
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(ModelSpec).validate_python(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"][1:]) or "kind"
        raise ValueError(f"{loc}: {err['msg']}") from None


class JobSpec(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    storage: str = Field("./runs", description="Local path or s3://bucket/prefix.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    data: DataSpec | None = None
    model: ModelSpec | None = None
    search: SearchSpec | None = None
    train: TrainSpec | None = None
    # Sections of the later stages live beside their stages (bigopt/<stage>/spec.py), with
    # their own cross-field rules (``problems``).
    compress: CompressSpec | None = None
    export: ExportSpec | None = None
    # not a stage: what report.md sets this run beside (bigopt/report/spec.py)
    report: ReportSpec | None = None

    def stages(self) -> list[str]:
        """The stages this spec runs, in the stage table's order (``bigopt.stages.STAGES``)."""
        from bigopt.stages import stage_names  # the table imports no heavy module

        return [s for s in stage_names() if getattr(self, s, None) is not None]

    @property
    def context(self) -> int | None:
        """Tokens per training window: ``data.context``, else the model's (preset-aware)."""
        if self.data is not None and self.data.context is not None:
            return self.data.context
        return self.model.config()["context"] if isinstance(self.model, GPTModelSpec) else None


# --------------------------------------------------------------------------- checks
def cross_field_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """Rules that involve more than one field; each names the field to change. Each section
    brings its own (``section.problems(spec)``, beside its stage); the model's are here."""
    problems: list[tuple[str, str]] = []
    model = spec.model
    if isinstance(model, GPTModelSpec):
        gpt = model.config()
        if gpt["d_model"] % gpt["n_head"]:
            problems.append(("model.n_head", f"{gpt['n_head']} must divide d_model={gpt['d_model']}"))
    for name in type(spec).model_fields:
        section = getattr(spec, name)
        if hasattr(section, "problems"):
            problems += section.problems(spec)
    return problems


# --------------------------------------------------------------------------- loading
def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c), with c parsed as YAML (ints, bools, null, lists)."""
    if "=" not in item:
        raise SpecError([(item, "override must look like section.field=value")])
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def set_path(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """``raw[a][b] = value`` for ``path`` ``["a", "b"]``, creating sections on the way."""
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError([(".".join(path), f"{part!r} is not a section")])
        node = child
    node[path[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        set_path(out, path, value)
    return out


def with_values(spec: JobSpec, values: dict[str, Any]) -> JobSpec:
    """``spec`` with ``{"train.lr": 0.01, ...}`` applied and validated again (a search trial's
    config, which holds typed values rather than ``--set`` strings)."""
    raw = spec.model_dump(mode="json", exclude_unset=True)
    for key, value in values.items():
        set_path(raw, key.split("."), value)
    return parse_spec(raw)


def _format_loc(loc: tuple[Any, ...]) -> str:
    # Drop the discriminator tag pydantic inserts for tagged unions ("model.gpt.n_head").
    parts = [str(p) for p in loc]
    if len(parts) >= 2 and parts[0] == "model" and parts[1] in ("gpt", "cnn", "mlp"):
        parts.pop(1)
    if len(parts) >= 3 and parts[:2] == ["data", "source"] and parts[2] in SOURCE_TAGS:
        parts.pop(2)
    if len(parts) >= 4 and parts[:2] == ["data", "steps"] and parts[3] in STEP_KINDS:
        parts.pop(3)
    if len(parts) >= 4 and parts[:2] == ["compress", "steps"] and parts[3] in COMPRESS_STEP_KINDS:
        parts.pop(3)
    return ".".join(parts) or "<spec>"


def parse_spec(raw: dict[str, Any]) -> JobSpec:
    """Validate a dict into a JobSpec, raising SpecError with every problem found."""
    if not isinstance(raw, dict):
        raise SpecError([("<spec>", "the spec must be a YAML mapping of sections")])
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see jobs/README.md)"
            problems.append((_format_loc(err["loc"]), msg))
        raise SpecError(problems) from None
    problems = cross_field_problems(spec)
    if problems:
        raise SpecError(problems)
    return spec


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> JobSpec:
    """Read a YAML spec, apply ``--set`` overrides, validate."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise SpecError([("<spec>", f"file not found: {path}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([("<spec>", f"not valid YAML: {exc}")]) from None
    return parse_spec(apply_overrides(raw, overrides))


def dump_spec(spec: JobSpec) -> str:
    """The resolved spec as YAML, written next to the run's artifacts."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
