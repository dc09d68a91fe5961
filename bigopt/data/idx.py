"""IDX files (the MNIST / Fashion-MNIST format) read with numpy, gzip-compressed or raw.

An IDX file is a big-endian header then the data: two zero bytes, a type byte (0x08: unsigned
byte, the only type these data sets use), a byte with the number of dimensions, one uint32 per
dimension, then the values in C order. Labels are ``0x00000801`` (1 dim: N), images
``0x00000803`` (3 dims: N, rows, cols). Files are read from a local directory or an
``s3://`` prefix, each part (train, t10k) in its own Ray task when Ray is up. Everything is
checked against the header, and a file that disagrees (wrong magic, truncated, trailing bytes,
images and labels of different counts) raises ``IdxError`` naming the file.

The Debian package ``dataset-fashion-mnist`` installs the four files into
``/usr/share/datasets/fashion-mnist``: ``train-*`` (60,000 rows) and ``t10k-*`` (10,000 rows,
the data set's own test set).
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: where ``apt-get install dataset-fashion-mnist`` puts the files
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
LABELS_MAGIC = 0x0801
IMAGES_MAGIC = 0x0803
#: file prefix per part of the data set -> the split its rows go to
PARTS = {"train": "train", "t10k": "test"}


class IdxError(ValueError):
    """An IDX file that is not what its header (or its partner file) says."""


def _locate(root: str | Path) -> tuple[Any, str, str]:
    """(pyarrow filesystem, path inside it, how to name it) for a local dir or ``s3://`` prefix."""
    from bigopt.runtime import filesystem_for

    root = str(root)
    fs, base = filesystem_for(root)
    return fs, base, root.rstrip("/")


def part_files(root: str | Path, part: str) -> tuple[str, str] | None:
    """(images, labels) of ``part`` ("train" or "t10k") under ``root`` (a local directory or an
    ``s3://`` prefix): the ``.gz`` file, else the uncompressed one; None when either is missing."""
    from pyarrow import fs as pafs

    fs, base, shown = _locate(root)
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        names = [f"{part}-{kind}-ubyte.gz", f"{part}-{kind}-ubyte"]
        infos = fs.get_file_info([f"{base}/{n}" for n in names])
        name = next((n for n, i in zip(names, infos, strict=True) if i.type == pafs.FileType.File), None)
        if name is None:
            return None
        found.append(f"{shown}/{name}")
    return found[0], found[1]


def _read_bytes(path: str) -> bytes:
    fs, inner, _ = _locate(path)
    try:
        with fs.open_input_stream(inner, compression=None) as f:  # gzip checked below
            raw = f.read()
        return gzip.decompress(raw) if path.endswith(".gz") else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:  # truncated or not gzip at all
        raise IdxError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None


def parse_idx(raw: bytes, expected_magic: int, name: str = "<bytes>") -> np.ndarray:
    """The uint8 array an IDX file holds, shaped by its header; ``IdxError`` when the magic is
    not ``expected_magic`` or the data does not match the header's size."""
    if len(raw) < 4:
        raise IdxError(f"{name}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        what = "labels" if expected_magic == LABELS_MAGIC else "images"
        raise IdxError(f"{name}: magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
                       f"(IDX unsigned-byte {what}); not an IDX {what} file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{name}: header truncated ({len(raw)} bytes, {ndim} dimensions need "
                       f"{header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    got = len(raw) - header
    if got != expected:
        state = "truncated" if got < expected else "has trailing bytes"
        raise IdxError(f"{name}: {state}: header says shape {shape} ({expected} bytes of data), "
                       f"file holds {got}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw, local or ``s3://``) into a uint8 array."""
    path = str(path)
    return parse_idx(_read_bytes(path), expected_magic, path)


@dataclass
class IdxPart:
    """One part (train or t10k) of an IDX data set."""

    split: str  # the split its rows go to: "train" (val is carved from it later) or "test"
    images: np.ndarray  # [N, rows, cols] uint8
    labels: np.ndarray  # [N] uint8
    files: tuple[str, str]
    sha256: str  # of the decoded header-checked contents (images then labels)


def read_part(root: str | Path, part: str, max_rows: int | None = None) -> IdxPart:
    """Images and labels of ``part`` ("train" or "t10k"), checked against each other; the
    first ``max_rows`` rows when set."""
    files = part_files(root, part)
    if files is None:
        raise FileNotFoundError(f"{root}: no {part}-images-idx3-ubyte[.gz] / "
                                f"{part}-labels-idx1-ubyte[.gz] (apt-get install "
                                "dataset-fashion-mnist)")
    image_file, label_file = files
    images = read_idx(image_file, IMAGES_MAGIC)
    labels = read_idx(label_file, LABELS_MAGIC)
    if images.ndim != 3:
        raise IdxError(f"{image_file}: {images.ndim} dimensions, expected 3 (count, rows, cols)")
    if labels.ndim != 1:
        raise IdxError(f"{label_file}: {labels.ndim} dimensions, expected 1 (count)")
    if len(images) != len(labels):
        raise IdxError(f"{image_file} holds {len(images)} images but {label_file} holds "
                       f"{len(labels)} labels")
    digest = hashlib.sha256(images.tobytes())
    digest.update(labels.tobytes())
    if max_rows:
        images, labels = images[:max_rows], labels[:max_rows]
    return IdxPart(PARTS[part], images, labels, (image_file, label_file),
                   digest.hexdigest())
