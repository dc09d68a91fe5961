"""The typed job spec: the single source of configuration for a bigopt run.

One pydantic model per YAML section. Precedence is ``--set`` > YAML > defaults. Unknown keys
are errors (``extra="forbid"``) because a misspelt key that is silently ignored trains the
wrong model for hours. ``load_spec`` collects *every* problem and raises one ``SpecError`` whose
lines read ``field.path: message``, so ``bigopt validate`` can print them without starting Ray.

This module imports nothing from bigopt but the pure-data preset table (``bigopt.presets``):
every other module depends on it, not the reverse. Everything *derived* from a spec (task,
context, architecture, layout, precision, DeepSpeed config) is decided once, by
``bigopt.resolve.resolve``.
"""

from __future__ import annotations

import copy
import glob
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator

from bigopt.presets import GPT_PRESETS


class SpecError(ValueError):
    """A spec that cannot run. ``problems`` holds ``(field_path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{path}: {msg}" for path, msg in problems))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


# --------------------------------------------------------------------------- data
class TextTreeSource(Section):
    """A directory of text files, e.g. Python's own standard library as a code corpus."""

    kind: Literal["text_tree"] = "text_tree"
    path: str = Field("stdlib", description="A directory, an s3:// prefix, or 'stdlib' for Python's stdlib.")
    include: list[str] = Field(default_factory=lambda: ["*.py"])
    exclude: list[str] = Field(
        default_factory=lambda: ["site-packages/*", "dist-packages/*", "test/*", "tests/*"]
    )
    max_files: int | None = Field(None, ge=1, description="Cap, taken in sorted path order.")
    max_file_bytes: int = Field(
        1_000_000, ge=1, description="Larger files are quarantined (generated/vendored code)."
    )


class ImageSource(Section):
    """Labelled images; ``digits`` is scikit-learn's bundled 8x8 handwritten digits."""

    kind: Literal["digits"] = "digits"
    max_rows: int | None = Field(None, ge=1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of every image this source yields."""
        return (1, 8, 8)


#: where Debian's ``dataset-fashion-mnist`` package installs its IDX files
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = [f"{part}-{kind}-ubyte" for part in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]


class IdxSource(Section):
    """Labelled 28x28 grey images in IDX files (MNIST's format), gzip-compressed or raw:
    ``train-*`` rows give train (and val, by ``data.split.val``), ``t10k-*`` rows the test split."""

    kind: Literal["idx"] = "idx"
    path: str = Field(FASHION_MNIST_DIR, description="Directory (local or s3://bucket/prefix) "
                      "holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz] and the "
                      "t10k-* pair (default: "
                      "Fashion-MNIST from `apt-get install dataset-fashion-mnist`).")
    max_rows: int | None = Field(None, ge=1, description="Cap per file pair (train and t10k).")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 28, 28)


class TableSource(Section):
    """A text corpus in JSONL, CSV or Parquet files (local or ``s3://``): one record, one row."""

    kind: Literal["table"]
    format: Literal["jsonl", "csv", "parquet"]
    path: str = Field(description="A file, a directory (its *.jsonl / *.csv / *.parquet files, "
                      "recursively) or a glob; local or s3://bucket/prefix.")
    text: str = Field("text", description="Column holding the text.")
    id: str | None = Field(None, description="Column identifying a record (the split key); "
                           "null: '<file>#<row index>'.")


class ImageFolderSource(Section):
    """PNG/JPEG images in ``<path>/<class>/``: the folder name is the label (classes sorted by
    name -> ids); each image resized to ``image_size`` and made grey (1) or RGB (3)."""

    kind: Literal["image_folder"]
    path: str = Field(description="A directory, local or s3://bucket/prefix.")
    image_size: int = Field(28, ge=4)
    channels: Literal[1, 3] = 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


def _source_kind(value: Any) -> str:
    # `kind` may be left out for the common case: a tree of text files.
    if isinstance(value, dict):
        return value.get("kind", "text_tree")
    return getattr(value, "kind", "text_tree")


SourceSpec = Annotated[
    Annotated[TextTreeSource, Tag("text_tree")] | Annotated[ImageSource, Tag("digits")]
    | Annotated[IdxSource, Tag("idx")] | Annotated[TableSource, Tag("table")]
    | Annotated[ImageFolderSource, Tag("image_folder")],
    Discriminator(_source_kind),
]
#: sources of text (a language model's) and of labelled images (a classifier's)
TEXT_SOURCES = (TextTreeSource, TableSource)
IMAGE_SOURCES = (ImageSource, IdxSource, ImageFolderSource)
SOURCE_TAGS = ("text_tree", "digits", "idx", "table", "image_folder")


class SplitSpec(Section):
    val: float = Field(0.05, ge=0, lt=1)
    test: float = Field(0.0, ge=0, lt=1)
    key: str = Field(
        "auto",
        description="Column hashed to choose the split (auto: path for text, id for images), "
        "so all windows of one file land in the same split (no leakage) and the split does "
        "not depend on row order.",
    )
    seed: int = 0
    stratify: bool = Field(
        False,
        description="Keep each label's share equal across train/val/test: within a label, units "
        "are ranked by the key's hash and the first round(n*test) go to test, the next "
        "round(n*val) to val (labelled sources only).",
    )


class IncompleteStep(Section):
    """Rows with a missing or empty field, text that is not UTF-8, non-finite pixels, or a
    missing label."""

    kind: Literal["incomplete"]


class NoiseStep(Section):
    """Text noise filters: length bounds, share of non-printable characters, share of repeated
    lines, and rows matching a regular expression (the configurable predicate)."""

    kind: Literal["noise"]
    min_chars: int = Field(1, ge=0)
    max_chars: int | None = Field(None, ge=1)
    max_nonprintable: float = Field(0.05, ge=0, le=1, description="Share of characters that are "
                                    "neither printable nor whitespace (binary or mojibake).")
    max_repeated_lines: float = Field(0.5, ge=0, le=1, description="Share of non-blank lines "
                                      "that repeat an earlier line of the same row.")
    reject_patterns: list[str] = Field(
        default_factory=list, description="Regular expressions: a row matching any is rejected "
        "(e.g. 'DO NOT EDIT' for generated code).")


class ExactDedupStep(Section):
    """Rows whose content hashes equal an earlier row's (smallest key kept)."""

    kind: Literal["exact_dedup"]


class NearDedupStep(Section):
    """Near duplicates by MinHash + LSH: signatures in Ray Data map tasks, candidate pairs from
    LSH bands grouped by Ray Data, clusters by connected components."""

    kind: Literal["near_dedup"]
    threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity.")
    shingle: int = Field(5, ge=1, description="Shingle length.")
    num_perm: int = Field(128, ge=16, le=1024)
    action: Literal["drop", "group"] = Field(
        "drop", description="drop: keep one row per cluster; group: keep all, and keep each "
        "cluster on one side of the split.")


class LabelStep(Section):
    """Unknown or malformed labels rejected; suspected label errors flagged or dropped by
    confident learning (cleanlab) on out-of-fold predictions of a quick model."""

    kind: Literal["labels"]
    action: Literal["flag", "drop"] = "flag"
    folds: int = Field(5, ge=2)
    num_classes: int | None = Field(None, ge=2)
    model: Literal["logistic", "mlp", "cnn"] | list[Literal["logistic", "mlp", "cnn"]] = Field(
        "logistic", description="The quick model(s) whose out-of-fold probabilities feed "
        "confident learning; a list averages them (an ensemble: [cnn, mlp] flags fewer clean but "
        "ambiguous rows).")
    cnn_epochs: int = Field(4, ge=1, description="Training epochs per fold of the cnn model.")
    flip: bool = Field(False, description="The labels survive a mirror image (clothes, natural "
                       "images; not digits or text): the cnn trains on random horizontal flips "
                       "and averages each image's prediction with its mirror's.")

    @field_validator("model")
    @classmethod
    def _members(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("a list of distinct models, at least one")
        return value


STEP_KINDS = ("incomplete", "noise", "exact_dedup", "near_dedup", "labels")
StepSpec = Annotated[IncompleteStep | NoiseStep | ExactDedupStep | NearDedupStep | LabelStep,
                     Field(discriminator="kind")]


class AugmentSpec(Section):
    """Image augmentation (kornia), seeded: at prepare time (``copies`` materialised copies of
    each training row, counted) or on the fly as training reads each batch."""

    when: Literal["prepare", "train"] = "train"
    copies: int = Field(1, ge=1, description="prepare: augmented copies per training row.")
    crop_padding: int = Field(2, ge=0, description="Random crop after zero-padding by this.")
    flip: bool = True
    rotation: float = Field(10.0, ge=0, le=180, description="Degrees, either way.")
    brightness: float = Field(0.1, ge=0, le=1)
    contrast: float = Field(0.1, ge=0, le=1)
    noise_std: float = Field(0.02, ge=0, le=1)
    seed: int = 0


class DataSpec(Section):
    source: SourceSpec = Field(default_factory=TextTreeSource)
    split: SplitSpec = Field(default_factory=SplitSpec)
    tokenizer: Literal["bytes", "bpe"] = Field(
        "bytes", description="bytes: UTF-8 bytes as tokens (vocab 256). bpe: a byte-level BPE "
        "trained on the training split with Hugging Face tokenizers (data.vocab_size tokens), "
        "saved as data/tokenizer.json in the data artifact; nothing comes from a hub.")
    vocab_size: int = Field(4096, ge=260, le=262144, description="bpe: tokens in the vocabulary "
                            "(model.vocab_size must be at least this).")
    context: int | None = Field(
        None, ge=8, description="Tokens per training window; null: model.context."
    )
    steps: list[StepSpec] = Field(
        default_factory=list, description="Cleaning steps, run in this order on the source rows "
        "before the split; each writes its rejected rows to data/rejects/ with the reason.")
    augment: AugmentSpec | None = Field(None, description="Image sources only.")
    rows_per_shard: int = Field(4096, ge=1)
    shuffle_seed: int | None = Field(
        0, description="Rows are written in an order shuffled by this seed (a hash of each "
        "row's identity: the same for every run and cluster). null: source order (sorted by "
        "path, then window), which puts the alphabetically first files first.")


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


# --------------------------------------------------------------------------- train
class ZeroSpec(Section):
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = Field(False, description="Optimizer state in CPU RAM (ZeRO>=1).")
    offload_params: bool = Field(False, description="Parameters in CPU RAM (ZeRO-3 only).")


class PipelineSpec(Section):
    stages: int = Field(1, ge=1, description="Pipeline stages; workers / stages = data ranks.")
    micro_batches: int = Field(4, ge=1, description="Micro-batches per step in the pipeline.")
    partition: str = Field(
        "parameters", description="DeepSpeed partition_method: parameters | uniform | type:REGEX"
    )


class FP16Spec(Section):
    """DeepSpeed's dynamic loss scaler (fp16 only)."""

    loss_scale: float = Field(0, ge=0, description="0: dynamic; >0: a fixed scale.")
    initial_scale_power: int = Field(16, ge=0, le=32)
    loss_scale_window: int = Field(1000, ge=1)
    hysteresis: int = Field(2, ge=1)
    min_loss_scale: float = Field(1, gt=0)


class ScheduleSpec(Section):
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of lr.")


DEFAULT_MAX_FAILURES = 3


class TrainSpec(Section):
    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    zero: ZeroSpec = Field(default_factory=ZeroSpec)
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "auto", description="auto: fp16 on GPUs, bf16 on CPUs (DeepSpeed refuses fp16 there)."
    )
    fp16: FP16Spec = Field(default_factory=FP16Spec)
    activation_checkpointing: bool = False
    batch_size: int = Field(16, ge=1, description="Micro-batch per data-parallel worker.")
    data_order: Literal["auto", "streaming", "deterministic"] = Field(
        "auto",
        description="deterministic: one order fixed by the seed (block order and a local "
        "buffer shuffled per epoch), batches dealt by data-parallel rank: the same spec and seed "
        "give the same loss curve, a resume skips exactly the batches already seen, and "
        "pipeline stages see identical batches. streaming: Ray's streaming_split, rows reach "
        "whichever worker asks first (not reproducible). auto: deterministic.",
    )
    shuffle_buffer: int = Field(
        1024, ge=0, description="Rows in the local shuffle buffer, reseeded per epoch; with the "
        "deterministic order the block order is shuffled per epoch too. 0: read in shard order.")
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(300, ge=1)
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw for transformers; sgd (with momentum) for CNNs, and for "
        "strategy-equivalence checks, where Adam's g/|g| would amplify rounding noise.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    lr: float = Field(3.0e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    clip_grad: float = Field(1.0, ge=0, description="0 disables clipping.")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=0, description="0: evaluate only at the start and the end.")
    eval_batches: int = Field(8, ge=1, description="Validation batches per worker per eval.")
    checkpoint_every: int = Field(100, ge=0, description="0: checkpoint only at the end.")
    checkpoint_at: list[int] = Field(
        default_factory=list,
        description="Extra steps to checkpoint, e.g. [1] to inspect the first update "
        "(torchtitan's first-step checkpoint).",
    )
    keep_last: int = Field(2, ge=1)
    max_failures: int | None = Field(
        None, ge=0, description="Worker-group restarts Ray Train may do after a failure. null: "
        f"{DEFAULT_MAX_FAILURES} when checkpoint_every > 0 (a restart resumes from the newest "
        "checkpoint, repeating at most one interval), else 0 (a restart would start over).")
    seed: int = 0


# --------------------------------------------------------------------------- search
DOMAIN_KINDS = {"choice": "a non-empty list of values", "randint": "[lower, upper) integers",
                "qrandint": "[lower, upper, q] integers", "uniform": "[lower, upper]",
                "loguniform": "[lower, upper], lower > 0", "quniform": "[lower, upper, q]",
                "qloguniform": "[lower, upper, q], lower > 0"}


def domain_problem(value: Any) -> str | None:
    """Why ``value`` is not a search domain (``{choice: [...]}``, ``{loguniform: [a, b]}``, ...)."""
    if not isinstance(value, dict) or len(value) != 1:
        return ("must be one of {" + ", ".join(f"{k}: {v}" for k, v in DOMAIN_KINDS.items()) + "}")
    (kind, args), = value.items()
    if kind not in DOMAIN_KINDS:
        return f"unknown domain {kind!r}; expected one of: {', '.join(DOMAIN_KINDS)}"
    if not isinstance(args, list) or not args:
        return f"{kind}: expects {DOMAIN_KINDS[kind]} (an empty choice has nothing to search)"
    if kind == "choice":
        return None
    want = 3 if kind.startswith("q") else 2
    if len(args) != want or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        return f"{kind}: expects {DOMAIN_KINDS[kind]}, got {args!r}"
    if args[0] >= args[1]:
        return f"{kind}: lower {args[0]} must be below upper {args[1]}"
    if "log" in kind and args[0] <= 0:
        return f"{kind}: lower must be > 0 on a log scale"
    return None


class ArchSpaceSpec(Section):
    """An architecture space over the model zoo (``bigopt.search.arch``). Every list is a choice.

    Images: a model is a stem and ``depth`` stages; each stage picks its block type, width,
    kernel size (resnet/plain) and heads (transformer), and all but the first halve the
    resolution. ``plain`` is ``resnet`` without its skip connection (the skip pattern as a
    choice). ``mlp`` is a family of its own (depth x width). Text: GPT depth, width, heads.
    Choices that do not apply (a kernel for a dense block, the stages past ``depth``) are
    conditional: ignored when building the model, and shown as null in ``trials.parquet``.
    """

    families: list[Literal["cnn", "mlp", "gpt"]] = Field(
        default_factory=lambda: ["cnn", "mlp"], min_length=1,
        description="Model kinds to search (cnn and mlp for images, gpt for text).")
    depth: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1,
                             description="Stages (cnn), hidden layers (mlp) or blocks (gpt).")
    blocks: list[Literal["resnet", "plain", "dense", "transformer"]] = Field(
        default_factory=lambda: ["resnet", "plain", "dense", "transformer"], min_length=1)
    widths: list[int] = Field(default_factory=lambda: [16, 32, 64], min_length=1,
                              description="Channels per cnn stage, d_model for gpt.")
    stem: list[int] = Field(default_factory=lambda: [16, 32], min_length=1)
    kernels: list[Literal[3, 5, 7]] = Field(default_factory=lambda: [3, 5], min_length=1)
    heads: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    mlp_widths: list[int] = Field(default_factory=lambda: [64, 128, 256, 512], min_length=1)
    max_params: int | None = Field(
        None, ge=1, description="Points with more parameters are rejected before a trial starts.")


class EvolutionOptions(Section):
    population: int = Field(8, ge=2)
    tournament: int = Field(3, ge=1)
    mutations: int = Field(1, ge=1, description="Decisions changed per child.")


class RLOptions(Section):
    """REINFORCE controller settings; null: ``bigopt.search.RLSearcher``'s defaults."""

    policy: Literal["lstm", "transformer"] = "lstm"
    lr: float | None = Field(None, gt=0)
    entropy_weight: float | None = Field(None, ge=0)
    baseline_decay: float | None = Field(None, ge=0, lt=1)


class SchedulerSpec(Section):
    """Trial scheduling, in training steps. asha: stop poor trials early. pbt / pb2: every
    ``interval_steps`` the bottom ``quantile`` of trials copies a top trial's checkpoint
    (exploit) and changes its ``mutate`` values (explore: PBT perturbs, PB2 fits a GP bandit)."""

    kind: Literal["fifo", "asha", "pbt", "pb2"] = "fifo"
    grace_steps: int = Field(50, ge=1, description="asha: steps before a trial can be stopped.")
    reduction_factor: float = Field(3, gt=1)
    interval_steps: int = Field(50, ge=1, description="pbt/pb2: steps between exploit/explore.")
    quantile: float = Field(0.25, gt=0, le=0.5)
    synch: bool = Field(
        True, description="pbt/pb2: trials meet at every interval (Tune's synch PBT), so each "
        "exploit finds the donor's checkpoint of that interval. false: asynchronous PBT, which "
        "skips an exploit whose donor ran ahead (measured here with few trials on 2 cores).")
    mutate: dict[str, Any] = Field(
        default_factory=dict, description="pbt/pb2: spec paths to change during training, as "
        "domains ({loguniform: [1e-4, 1e-2]}); default: the space's train.lr and "
        "train.batch_size.")


class SearchSpec(Section):
    searcher: Literal["evolution", "rl", "random", "tpe"] = Field(
        "evolution", description="evolution (regularized), rl (REINFORCE controller), random, "
        "or tpe (Optuna's TPE through Tune's OptunaSearch, the reference).")
    num_trials: int = Field(16, ge=1)
    max_concurrent: int = Field(2, ge=1)
    metric: str = Field("auto", description="A reported metric (val_loss, val_acc); auto: "
                        "val_acc for classifiers, val_loss otherwise.")
    mode: Literal["min", "max", "auto"] = "auto"
    seed: int = 0
    space: dict[str, Any] = Field(
        default_factory=dict, description="Hyperparameters: spec path -> domain, e.g. "
        "train.lr: {loguniform: [1.0e-4, 1.0e-2]}.")
    arch: ArchSpaceSpec | None = None
    trial: dict[str, Any] = Field(
        default_factory=lambda: {"cluster.num_workers": 1}, description="Spec paths set for "
        "every trial (its budget: train.max_steps, ...). One worker runs in the trial process; "
        "more run a TorchTrainer inside the trial.")
    @field_validator("trial", mode="before")
    @classmethod
    def _flatten_trial(cls, value: Any) -> Any:
        # `--set search.trial.train.max_steps=100` arrives nested: {"train": {"max_steps": 100}}
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}

        def walk(node: dict[str, Any], prefix: str) -> None:
            for key, item in node.items():
                if isinstance(item, dict):
                    walk(item, f"{prefix}{key}.")
                else:
                    flat[f"{prefix}{key}"] = item

        walk(value, "")
        return flat

    objectives: list[Literal["params", "flops", "latency_ms"]] = Field(
        default_factory=lambda: ["params", "latency_ms"],
        description="Costs the Pareto fronts weigh the metric against.")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    evolution: EvolutionOptions = Field(default_factory=EvolutionOptions)
    rl: RLOptions = Field(default_factory=RLOptions)


# --------------------------------------------------------------------------- job
from bigopt.compress.spec import COMPRESS_STEP_KINDS, CompressSpec  # noqa: E402
from bigopt.export.spec import ExportSpec  # noqa: E402


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
def layout_problems(world_size: int, pp_stages: int, zero_stage: int) -> list[tuple[str, str]]:
    """The parallel-layout rules, in one place (``Layout`` raises on the same ones)."""
    problems = []
    if world_size % pp_stages:
        problems.append(("train.pipeline.stages",
                         f"{pp_stages} must divide cluster.num_workers={world_size}"))
    if pp_stages > 1 and zero_stage > 1:
        problems.append(("train.zero.stage", f"{zero_stage} cannot combine with pipeline stages>1 "
                         "(DeepSpeed's pipeline engine supports ZeRO 0 and 1); use 0 or 1"))
    return problems


def cross_field_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """Rules that involve more than one field; each names the field to change. Sections that
    live beside their stage bring their own (``section.problems(spec)``)."""
    problems: list[tuple[str, str]] = []
    for name in type(spec).model_fields:
        section = getattr(spec, name)
        if hasattr(section, "problems"):
            problems += section.problems(spec)
    train, model, cluster = spec.train, spec.model, spec.cluster
    if isinstance(model, GPTModelSpec):
        gpt = model.config()
        if gpt["d_model"] % gpt["n_head"]:
            problems.append(("model.n_head", f"{gpt['n_head']} must divide d_model={gpt['d_model']}"))
    if spec.data is not None and isinstance(spec.data.source, IMAGE_SOURCES):
        source = spec.data.source
        (c, h, w), kind = source.image_shape, source.kind
        if model is not None and isinstance(model, GPTModelSpec):
            problems.append(("model.kind", "an image source feeds a 'cnn' or 'mlp' model"))
        if isinstance(model, MLPModelSpec) and model.in_features != c * h * w:
            problems.append(("model.in_features", f"{kind} images have {c * h * w} pixels "
                             f"({c}x{h}x{w})"))
        if isinstance(model, CNNModelSpec) and (model.image_size, model.in_channels) != (h, c):
            problems.append(("model.image_size", f"{kind} images are {c}x{h}x{w}: image_size {h}, "
                             f"in_channels {c}"))
        if isinstance(source, IdxSource):
            root = Path(source.path).expanduser()
            missing = [n for n in IDX_FILES if not any((root / m).is_file() for m in (n + ".gz", n))]
            if source.path.startswith("s3://"):
                missing = []  # checked when read (no network before Ray starts)
            elif "://" in source.path:
                problems.append(("data.source.path", f"{source.path!r}: use a local path or s3://"))
            if missing:  # caught before Ray starts, like a text_tree path
                hint = " (apt-get install dataset-fashion-mnist)" if source.path == FASHION_MNIST_DIR else ""
                problems.append(("data.source.path", f"{source.path!r} lacks the IDX files "
                                 f"{', '.join(m + '[.gz]' for m in missing)}{hint}"))
            if spec.data.split.test > 0:
                problems.append(("data.split.test", "an idx source's test split is its own t10k-* "
                                 "files; leave data.split.test at 0 (val is carved from train)"))
        if isinstance(source, ImageFolderSource) and not source.path.startswith("s3://") \
                and not Path(source.path).expanduser().is_dir():
            problems.append(("data.source.path", f"{source.path!r} is not a directory here "
                             f"(cwd {Path.cwd()})"))
    elif spec.data is not None and isinstance(spec.data.source, TableSource):
        source = spec.data.source
        local = Path(source.path).expanduser()
        if "://" in source.path and not source.path.startswith("s3://"):
            problems.append(("data.source.path", f"{source.path!r}: use a local path or s3://"))
        elif not source.path.startswith("s3://") and not (
                glob.glob(str(local)) if any(c in source.path for c in "*?[") else local.exists()):
            problems.append(("data.source.path", f"{source.path!r} does not exist here "
                             f"(cwd {Path.cwd()})"))
        if model is not None and not isinstance(model, GPTModelSpec):
            problems.append(("model.kind", "a table data source feeds a 'gpt' model only"))
        if spec.context is None:
            problems.append(("data.context", "set it, or add a gpt model section with context"))
    elif spec.data is not None:
        source = spec.data.source
        if "://" in source.path and not source.path.startswith("s3://"):
            problems.append(("data.source.path", f"{source.path!r}: use a local path or s3://"))
        elif source.path != "stdlib" and not source.path.startswith("s3://") \
                and not Path(source.path).expanduser().is_dir():
            # Caught here so `bigopt validate` and `bigopt run` fail before Ray starts; relative
            # paths are read from where bigopt runs (the job's working dir under ray job submit).
            problems.append(("data.source.path", f"{source.path!r} is not a directory here "
                             f"(cwd {Path.cwd()})"))
        if model is not None and not isinstance(model, GPTModelSpec):
            problems.append(("model.kind", "a text_tree data source feeds a 'gpt' model only"))
        if spec.context is None:
            problems.append(("data.context", "set it, or add a gpt model section with context"))
    if spec.data is not None:
        text = isinstance(spec.data.source, TEXT_SOURCES)
        if spec.data.augment is not None and text:
            problems.append(("data.augment", "augmentation is for image sources"))
        for i, step in enumerate(spec.data.steps):
            if step.kind in ("near_dedup", "noise") and not text:
                problems.append((f"data.steps.{i}.kind", f"{step.kind} works on text sources"))
            if step.kind == "labels" and text:
                problems.append((f"data.steps.{i}.kind", "labels needs a labelled (image) source"))
        if spec.data.split.stratify and text:
            problems.append(("data.split.stratify", "stratifying needs labels: an image source"))
    if spec.data is not None and spec.data.split.val + spec.data.split.test >= 1:
        problems.append(("data.split.val", "val + test must leave rows for training (< 1)"))
    if isinstance(model, GPTModelSpec) and spec.data is not None and spec.data.tokenizer == "bpe":
        if model.config()["vocab_size"] < spec.data.vocab_size:
            problems.append(("model.vocab_size", f"{model.config()['vocab_size']} < data.vocab_size "
                             f"{spec.data.vocab_size} (the BPE tokenizer's)"))
    if isinstance(model, GPTModelSpec) and spec.data is not None and spec.data.context:
        if spec.data.context > model.config()["context"]:
            problems.append(("data.context", f"{spec.data.context} > model.context "
                             f"({model.config()['context']})"))
    problems += search_problems(spec)
    if train is None:
        return problems
    if model is None:
        problems.append(("model", "the train stage needs a model section"))
    pp = train.pipeline.stages
    if train.strategy == "ddp":
        if pp > 1:
            problems.append(("train.pipeline.stages", "pipeline needs strategy: deepspeed"))
        if train.zero.offload_optimizer or train.zero.offload_params:
            problems.append(("train.zero", "offload needs strategy: deepspeed"))
        if train.precision == "fp16":
            problems.append(("train.precision", "fp16 loss scaling needs strategy: deepspeed"))
    zero_stage = train.zero.stage if train.strategy == "deepspeed" else 0
    problems += layout_problems(cluster.num_workers, pp, zero_stage)
    if train.strategy == "deepspeed":
        if train.zero.offload_optimizer and train.zero.stage == 0:
            problems.append(("train.zero.offload_optimizer", "needs zero.stage >= 1"))
        if train.zero.offload_params and train.zero.stage != 3:
            problems.append(("train.zero.offload_params", "needs zero.stage: 3"))
    if train.precision == "fp16" and cluster.gpus_per_worker == 0:
        problems.append(
            ("train.precision", "fp16 needs GPUs (DeepSpeed refuses it on CPU); use auto or bf16")
        )
    if pp > 1 and train.data_order == "streaming":
        problems.append(("train.data_order", "pipeline stages need identical batches: use "
                         "deterministic or auto"))
    if pp > 1 and train.activation_checkpointing:
        problems.append(("train.activation_checkpointing", "not supported with pipeline yet"))
    return problems


def search_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """A search section's rules: domains well formed, every path a real spec field, the
    architecture space fits the data, the scheduler fits the searcher."""
    search = spec.search
    if search is None:
        return []
    problems: list[tuple[str, str]] = []
    if spec.model is None:
        problems.append(("model", "the search stage needs a model section (the base every "
                         "trial's architecture and hyperparameters change)"))
    if spec.train is None:
        problems.append(("train", "the search stage needs a train section (trials train)"))
    if not search.space and search.arch is None:
        problems.append(("search.space", "nothing to search: add hyperparameters or search.arch"))
    probe: dict[str, Any] = {}
    for group, entries in (("space", search.space), ("scheduler.mutate", search.scheduler.mutate)):
        for path, domain in entries.items():
            why = domain_problem(domain)
            if why:
                problems.append((f"search.{group}.{path}", why))
            else:
                (kind, args), = domain.items()
                probe[path] = args[0]
    for field_path in {**probe, **search.trial}:
        if field_path.split(".")[0] in ("search", "name", "storage", "data"):
            problems.append((f"search.space.{field_path}", "a trial may change cluster, model "
                             "and train fields only"))
    if problems or spec.model is None or spec.train is None:
        return problems
    try:
        with_values(spec.model_copy(update={"search": None}), {**probe, **search.trial})
    except SpecError as exc:
        problems += [(f"search.space.{p}" if p.split(".")[0] in ("train", "model", "cluster")
                      else p, m) for p, m in exc.problems]
    if search.arch is not None and spec.data is not None:
        images = not isinstance(spec.data.source, TEXT_SOURCES)
        wrong = [f for f in search.arch.families if (f == "gpt") == images]
        if wrong:
            problems.append(("search.arch.families", f"{wrong} cannot read this data source "
                             f"({'images: cnn, mlp' if images else 'text: gpt'})"))
    if search.scheduler.kind in ("pbt", "pb2") and search.searcher != "random":
        problems.append(("search.searcher", f"{search.scheduler.kind} draws its own starting "
                         "population (Tune refuses a searcher beside it): use random"))
    if search.evolution.tournament > search.evolution.population:
        problems.append(("search.evolution.tournament",
                         f"{search.evolution.tournament} > population {search.evolution.population}"))
    if search.metric not in ("auto", "val_loss", "val_acc", "loss"):
        problems.append(("search.metric", f"{search.metric!r}: trials report val_loss, val_acc "
                         "(classifiers) and loss"))
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
