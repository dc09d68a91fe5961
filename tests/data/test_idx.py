"""The IDX reader (MNIST's file format) on files written here, and the idx data source on the
real Fashion-MNIST files (Debian's dataset-fashion-mnist, which .ci/run installs)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bigopt.data.idx import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    IdxError,
    parse_idx,
    read_idx,
    read_part,
)
from bigopt.spec import FASHION_MNIST_DIR, SpecError, parse_spec

from factories import spec_dict

REAL = Path(FASHION_MNIST_DIR)
needs_real_files = pytest.mark.skipif(
    not (REAL / "t10k-labels-idx1-ubyte.gz").exists(),
    reason=f"Fashion-MNIST IDX files not in {REAL} (apt-get install dataset-fashion-mnist)")


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000 08 <ndim>, big-endian dims, the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_part(root: Path, part: str, images: np.ndarray, labels: np.ndarray, gz: bool = True):
    root.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        data = idx_bytes(array)
        name = root / f"{part}-{kind}-ubyte"
        if gz:
            with gzip.open(f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            name.write_bytes(data)


def small_set(root: Path, n_train: int = 50, n_test: int = 20, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    write_part(root, "train", rng.integers(0, 256, (n_train, 28, 28)),
               rng.integers(0, 10, n_train), gz)
    write_part(root, "t10k", rng.integers(0, 256, (n_test, 28, 28)),
               rng.integers(0, 10, n_test), gz)


def test_parse_round_trips_images_and_labels():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(images), IMAGES_MAGIC), images)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    assert np.array_equal(parse_idx(idx_bytes(labels), LABELS_MAGIC), labels)


def test_gzip_and_raw_files_read_the_same(tmp_path):
    small_set(tmp_path / "gz", gz=True)
    small_set(tmp_path / "raw", gz=False)
    a, b = read_part(tmp_path / "gz", "train"), read_part(tmp_path / "raw", "train")
    assert a.images.shape == (50, 28, 28) and a.labels.shape == (50,)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert a.sha256 == b.sha256 and a.split == "train"
    assert read_part(tmp_path / "gz", "t10k", max_rows=5).images.shape == (5, 28, 28)
    assert read_part(tmp_path / "gz", "t10k").split == "test"


@pytest.mark.parametrize("cut", [3, 10, 16 + 28 * 28 * 7 + 5])
def test_truncated_file_is_an_error_naming_it(tmp_path, cut):
    small_set(tmp_path)
    data = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(data[:cut])
    with pytest.raises(IdxError, match="train-images-idx3-ubyte.*(too short|truncated)"):
        read_idx(bad, IMAGES_MAGIC)


def test_truncated_gzip_stream_is_an_error_naming_it(tmp_path):
    small_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(IdxError, match=r"train-images-idx3-ubyte\.gz: cannot read"):
        read_part(tmp_path, "train")


def test_wrong_magic_trailing_bytes_and_count_mismatch(tmp_path):
    small_set(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    with pytest.raises(IdxError, match=r"train-labels-idx1-ubyte: magic number 0x00000801"):
        read_idx(labels, IMAGES_MAGIC)  # a labels file where images were expected
    images.write_bytes(images.read_bytes() + b"\0\0")
    with pytest.raises(IdxError, match="train-images-idx3-ubyte: has trailing bytes"):
        read_part(tmp_path, "train")
    write_part(tmp_path, "train", np.zeros((5, 28, 28)), np.zeros(4), gz=False)
    with pytest.raises(IdxError, match="holds 5 images but .*train-labels-idx1-ubyte holds 4"):
        read_part(tmp_path, "train")


def idx_spec(tmp_path, path, model=None, **data):
    """A data (+ model) spec over the IDX files in ``path`` (the factory's text source and
    training section dropped)."""
    source = {"kind": "idx", "path": str(path), "max_files": None}
    raw = spec_dict(tmp_path, name="fm", train=None, model=None,
                    data={"source": source, "split": {"val": 0.2}, **data})
    if model is not None:
        raw["model"] = model
    return raw


def test_missing_files_are_a_spec_problem_before_ray(tmp_path):
    with pytest.raises(SpecError) as err:
        parse_spec(idx_spec(tmp_path, tmp_path / "nowhere"))
    assert [p for p, _ in err.value.problems] == ["data.source.path"]
    assert "train-images-idx3-ubyte" in str(err.value)
    small_set(tmp_path / "ok")
    spec = parse_spec(idx_spec(tmp_path, tmp_path / "ok"))
    assert spec.data.source.kind == "idx" and spec.data.source.max_rows is None


def test_image_models_must_match_the_sources_image_size(tmp_path):
    small_set(tmp_path / "ok")
    raw = idx_spec(tmp_path, tmp_path / "ok", model={"kind": "cnn", "image_size": 8})
    with pytest.raises(SpecError, match=r"model.image_size: idx images are 1x28x28"):
        parse_spec(raw)
    raw = idx_spec(tmp_path, tmp_path / "ok", model={"kind": "mlp", "in_features": 64})
    with pytest.raises(SpecError, match=r"model.in_features: idx images have 784 pixels"):
        parse_spec(raw)
    parse_spec(idx_spec(tmp_path, tmp_path / "ok", model={"kind": "mlp", "in_features": 784}))
    parse_spec(idx_spec(tmp_path, tmp_path / "ok", model={"kind": "cnn", "image_size": 28}))
    digits = spec_dict(tmp_path, name="d", train=None, model=None,
                       data={"source": {"kind": "digits", "path": None, "max_files": None}})
    digits["model"] = {"kind": "cnn", "image_size": 28}
    with pytest.raises(SpecError, match=r"model.image_size: digits images are 1x8x8"):
        parse_spec(digits)
    raw = idx_spec(tmp_path, tmp_path / "ok")
    raw["data"]["split"]["test"] = 0.1
    with pytest.raises(SpecError, match=r"data.split.test: .*t10k"):
        parse_spec(raw)


def _read_split(run, manifest, name):
    tables = [pq.read_table(run.fs.open_input_file(run.sub(s["path"])))
              for s in manifest["splits"][name]["shards"]]
    return [row for t in tables for row in t.to_pylist()]


def test_data_stage_on_written_idx_files(ray_session, tmp_path):
    from bigopt.data.prepare import run_data
    from bigopt.resolve import resolve
    from bigopt.runtime import RunDir

    small_set(tmp_path / "src", n_train=200, n_test=30)
    spec = parse_spec(idx_spec(tmp_path, tmp_path / "src", rows_per_shard=64))
    run = RunDir.create(spec.storage, spec.name)
    manifest, _ = run_data(resolve(spec), run.stage("data"))
    assert manifest["rows_in"] == 230 == manifest["rows_kept"]
    splits = {name: _read_split(run, manifest, name) for name in manifest["splits"]}
    assert {r["id"] for r in splits["test"]} == {f"fmnist-test-{i:05d}" for i in range(1, 31)}
    assert len(splits["train"]) + len(splits["val"]) == 200 and 20 < len(splits["val"]) < 60
    x = np.asarray(splits["train"][0]["inputs"], dtype=np.float32)
    assert x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1


def test_idx_files_on_s3_stratified(ray_session, s3_server, tmp_path):
    """The same files read from an S3 prefix (a real S3-protocol server), val carved from train
    with each label's exact share."""
    import os
    from collections import Counter

    import boto3

    from bigopt.data.prepare import run_data
    from bigopt.resolve import resolve
    from bigopt.runtime import RunDir

    small_set(tmp_path / "src", n_train=300, n_test=40)
    bucket = s3_server[len("s3://"):]
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for f in (tmp_path / "src").iterdir():
        client.put_object(Bucket=bucket, Key=f"idx/fm/{f.name}", Body=f.read_bytes())
    spec = parse_spec(idx_spec(tmp_path, f"{s3_server}/idx/fm", split={"val": 0.2, "stratify": True}))
    run = RunDir.create(spec.storage, spec.name)
    manifest, _ = run_data(resolve(spec), run.stage("data"))
    assert manifest["rows_in"] == 340 == manifest["rows_kept"]
    assert manifest["source"]["include"][0] == "train-images-idx3-ubyte.gz"
    counts = Counter((r["labels"], name) for name in ("train", "val")
                     for r in _read_split(run, manifest, name))
    for label in range(10):
        n = counts[(label, "train")] + counts[(label, "val")]
        assert counts[(label, "val")] == round(n * 0.2)
    assert len(_read_split(run, manifest, "test")) == 40
    # a prefix without the files is a clear error naming what is missing
    bad = parse_spec(idx_spec(tmp_path, f"{s3_server}/idx/none"))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        run_data(resolve(bad), RunDir.create(bad.storage, "bad").stage("data"))


@pytest.mark.slow
@needs_real_files
def test_data_stage_on_real_fashion_mnist(ray_session, tmp_path):
    """The real files, capped: rows conserved, test rows are t10k's, train+val are train's,
    pixels and labels as in the files."""
    from bigopt.data.prepare import run_data
    from bigopt.resolve import resolve
    from bigopt.runtime import RunDir

    spec = parse_spec(spec_dict(tmp_path, name="fm", train=None, model=None, data={
        "source": {"kind": "idx", "path": None, "max_files": None, "max_rows": 600},
        "split": {"val": 0.1}}))
    run = RunDir.create(spec.storage, spec.name)
    manifest, _ = run_data(resolve(spec), run.stage("data"))
    assert manifest["rows_in"] == 1200 == manifest["rows_kept"] + manifest["rows_rejected"]
    assert manifest["rows_rejected"] == 0
    assert manifest["splits"]["test"]["rows"] == 600
    assert manifest["splits"]["train"]["rows"] + manifest["splits"]["val"]["rows"] == 600
    test_part = read_part(REAL, "t10k", max_rows=600)
    by_id = {r["id"]: r for r in _read_split(run, manifest, "test")}
    assert set(by_id) == {f"fmnist-test-{i:05d}" for i in range(1, 601)}
    for i in (1, 77, 600):
        row = by_id[f"fmnist-test-{i:05d}"]
        assert row["labels"] == int(test_part.labels[i - 1])
        pixels = np.round(np.asarray(row["inputs"], dtype=np.float32)[0] * 255).astype(np.uint8)
        assert np.array_equal(pixels, test_part.images[i - 1])
    for name in ("train", "val"):
        assert all(r["id"].startswith("fmnist-train-") for r in _read_split(run, manifest, name))
    assert manifest["source"]["kind"] == "idx"


def test_default_path_is_the_debian_package_dir():
    from bigopt.spec import IdxSource

    assert IdxSource().path == "/usr/share/datasets/fashion-mnist" == FASHION_MNIST_DIR


@pytest.mark.slow
def test_train_stage_evaluates_the_whole_test_split(ray_session, tmp_path):
    """data + train on written IDX files: the t10k rows (33: batches of 8 deal 3 to one rank
    and 2 to the other) are all evaluated once, and test metrics reach result.json, the model
    artifact and the report."""
    import bigopt
    from bigopt.runtime import RunDir

    small_set(tmp_path / "src", n_train=160, n_test=33)
    raw = idx_spec(tmp_path, tmp_path / "src", model={"kind": "mlp", "in_features": 784,
                                                      "hidden": [32]})
    raw["train"] = {"strategy": "ddp", "precision": "fp32", "batch_size": 8, "max_steps": 4,
                    "eval_every": 0, "eval_batches": 1, "checkpoint_every": 0, "log_every": 1}
    run = RunDir(bigopt.run(parse_spec(raw)).run_uri)
    result = run.read_json("train/result.json")
    assert result["test_rows"] == 33
    assert 0 <= result["test_accuracy"] <= 1 and result["test_loss"] > 0
    assert result["artifact"]["metrics"]["test_accuracy"] == result["test_accuracy"]
    assert "test accuracy" in run.read_text("report.md")
