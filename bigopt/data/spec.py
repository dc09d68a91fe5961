"""The ``data`` section: source, split, cleaning steps, augmentation, tokenizer, shards; and its
rules (``DataSpec.problems``). Lives beside the data stage; ``bigopt.spec`` re-exports it."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from bigopt.sections import Section

if TYPE_CHECKING:
    from bigopt.spec import JobSpec

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


#: The cleaning a source gets when ``data.steps`` is left out (or null): every text corpus has
#: empty and undecodable files, byte-identical copies and near-copies (Python's own standard
#: library: 46 and 89, BENCHMARKS 7b), and images have exact copies; ``steps: []`` turns it off.
#: ``near_dedup`` and ``noise`` read text, so image sources get the other two.
DEFAULT_STEPS: dict[str, list[str]] = {
    "text": ["incomplete", "noise", "exact_dedup", "near_dedup"],
    "image": ["incomplete", "exact_dedup"],
}


def default_steps(source_kind: str) -> list[dict[str, str]]:
    """The ``data.steps`` a source of this kind gets when the spec names none."""
    modality = "text" if source_kind in ("text_tree", "table") else "image"
    return [{"kind": kind} for kind in DEFAULT_STEPS[modality]]


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
    cache: bool = Field(
        True, description="Reuse prepared data from <storage>/cache/data/<key>/ when the source "
        "files, this section, the context and bigopt's data code are unchanged (a cache hit skips "
        "the data stage); false: always prepare (and publish nothing).")
    steps: list[StepSpec] = Field(
        default_factory=list, description="Cleaning steps, run in this order on the source rows "
        "before the split; each writes its rejected rows to data/rejects/ with the reason. "
        "Left out or null: the source's defaults (text: incomplete, noise, exact_dedup, "
        "near_dedup; images and tables of images: incomplete, exact_dedup), written out in "
        "the run's spec.yaml; [] turns cleaning off.")
    engine: Literal["auto", "single", "distributed"] = Field(
        "auto", description="How the cleaning steps (and, for text, the whole stage) run. auto: "
        "by the input's measured size (bigopt.data.engine.choose_engine: up to "
        "SINGLE_TASK_MAX_BYTES, each step is one Ray task over one Arrow table, no shuffle; "
        "above, Ray Data's distributed transforms). single / distributed force one; the "
        "results are the same either way.")
    augment: AugmentSpec | None = Field(None, description="Image sources only.")
    rows_per_shard: int = Field(4096, ge=1)
    shuffle_seed: int | None = Field(
        0, description="Rows are written in an order shuffled by this seed (a hash of each "
        "row's identity: the same for every run and cluster). null: source order (sorted by "
        "path, then window), which puts the alphabetically first files first.")

    @model_validator(mode="before")
    @classmethod
    def _default_steps(cls, value: Any) -> Any:
        # Filled in here, from the raw section, so that "left out" and "null" differ from
        # "[]" and the resolved spec (spec.yaml, the fingerprint) lists the steps that run.
        if isinstance(value, dict) and value.get("steps") is None:
            value = {**value, "steps": default_steps(_source_kind(value.get("source") or {}))}
        return value

    def problems(self, spec: JobSpec) -> list[tuple[str, str]]:
        return data_problems(spec)


def data_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """The data section's rules, with the model it feeds (image shapes, text context)."""
    from bigopt.spec import CNNModelSpec, GPTModelSpec, MLPModelSpec

    problems: list[tuple[str, str]] = []
    model = spec.model
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
    return problems
