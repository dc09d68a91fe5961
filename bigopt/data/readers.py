"""Readers for user data, local or ``s3://``: text tables (JSONL, CSV, Parquet) and image folders.

Both list their files in the driver (pyarrow filesystems, so S3 works the same as disk) and
read them in parallel as Ray Data tasks; nothing is ever dropped silently:

- ``table``: one Ray Data task per file parses it with pyarrow and emits one source row per
  record, ``{path: <id value or "<file>#<row index>">, text: <utf-8 bytes>, reject_reason}``
  (parsing in the task itself gives every row its exact index in its file, and reads each
  file once). A file that does not parse is quarantined as one rejected row keyed by the file
  (``unreadable: ...``), like the text tree's unreadable files; a record whose text is missing
  or empty is rejected as ``incomplete: <column> is null|empty``. A file whose schema lacks
  the text (or id) column is a spec error naming ``data.source.text`` and the file.
- ``image_folder``: ``root/<class>/<image>``; classes sorted by name -> ids. Bytes come from
  ``ray.data.read_binary_files``; a ``map_batches`` decodes them with Pillow to float32 [C, H, W]
  in [0, 1]. A file that does not decode is rejected (``incomplete: undecodable image``).
"""

from __future__ import annotations

import fnmatch
import hashlib
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from bigopt.runtime import filesystem_for

TABLE_SUFFIXES = {"jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson"),
                  "csv": (".csv", ".csv.gz", ".tsv"),
                  "parquet": (".parquet", ".pq")}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SCHEMA = "schema: "  # reject-reason prefix of a file that lacks a named column (a spec error)
_GLOB = "*?["


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def list_source_files(uri: str, suffixes: tuple[str, ...]) -> tuple[pafs.FileSystem, str, list[str]]:
    """(filesystem, base path in it, files) for a file, a directory (files ending in one of
    ``suffixes``, recursively, hidden ``.``/``_`` names skipped) or a glob over either."""
    fs, path = filesystem_for(uri)
    pattern = None
    if any(ch in path for ch in _GLOB):
        first = min(i for i, ch in enumerate(path) if ch in _GLOB)
        pattern, path = path, path[:first].rsplit("/", 1)[0]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File and pattern is None:
        return fs, path.rsplit("/", 1)[0], [path]
    if info.type == pafs.FileType.NotFound and not uri.startswith("s3://"):
        raise FileNotFoundError(f"data.source.path: {uri} does not exist")
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = []
    for entry in found:
        if entry.type != pafs.FileType.File:
            continue
        rel = entry.path[len(path):].lstrip("/")
        if pattern is not None:
            if fnmatch.fnmatch(entry.path, pattern):
                files.append(entry.path)
        elif not _hidden(rel) and entry.path.lower().endswith(suffixes):
            files.append(entry.path)
    return fs, path, sorted(files)


# --------------------------------------------------------------------------- tables
def _parse_table(fs: pafs.FileSystem, path: str, fmt: str) -> Any:
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    if fmt == "parquet":
        with fs.open_input_file(path) as f:
            return pq.read_table(f)
    with fs.open_input_stream(path, compression="detect") as f:
        if fmt == "jsonl":
            return pjson.read_json(f)
        delimiter = "\t" if path.lower().endswith(".tsv") else ","
        return pcsv.read_csv(f, parse_options=pcsv.ParseOptions(delimiter=delimiter))


def _as_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def read_table_files(batch: dict[str, np.ndarray], uri: str, base: str, fmt: str, text: str,
                     id_column: str | None) -> dict[str, np.ndarray]:
    """Ray Data task: parse each file of the batch; one output row per record (or per file
    that does not parse). ``uri`` rebuilds the filesystem inside the task."""
    fs, _ = filesystem_for(uri)
    paths: list[str] = []
    texts: list[bytes] = []
    reasons: list[str] = []
    for path in batch["file"]:
        rel = path[len(base):].lstrip("/") or path.rsplit("/", 1)[-1]
        try:
            table = _parse_table(fs, path, fmt)
        except Exception as exc:  # noqa: BLE001 - any parse error quarantines the file
            message = " ".join(str(exc).split())[:300]
            paths.append(rel)
            texts.append(b"")
            reasons.append(f"unreadable: not valid {fmt} ({exc.__class__.__name__}: {message})")
            continue
        missing = [(field, col) for field, col in (("text", text), ("id", id_column))
                   if col is not None and col not in table.column_names]
        if missing:
            field, col = missing[0]
            paths.append(rel)
            texts.append(b"")
            reasons.append(f"{SCHEMA}data.source.{field}: no column {col!r} in {rel} "
                           f"(columns: {', '.join(table.column_names) or 'none'})")
            continue
        values = table.column(text).to_pylist()
        ids = table.column(id_column).to_pylist() if id_column else None
        for i, value in enumerate(values):
            data = _as_bytes(value)
            key = f"{rel}#{i}"
            reason = ""
            if ids is not None:
                if ids[i] is None or str(ids[i]) == "":
                    reason = f"incomplete: {id_column} is null"
                else:
                    key = str(ids[i])
            if data is None:
                reason = reason or f"incomplete: {text} is null"
            elif not data.strip():
                reason = reason or f"incomplete: {text} is empty"
            paths.append(key)
            texts.append(b"" if reason else data)
            reasons.append(reason)
    return {"path": np.array(paths, dtype=object), "text": np.array(texts, dtype=object),
            "reject_reason": np.array(reasons, dtype=object)}


def table_rows(src: Any) -> tuple[Any, int, dict[str, Any]]:
    """The ``table`` source as a materialized Ray Dataset ``{path, text, reject_reason}``
    (one row per record, plus one per quarantined file); returns (rows, files, info).
    Raises ``SpecError`` on ``data.source.text``/``id`` when a file lacks the column."""
    import ray

    from bigopt.spec import SpecError

    fs, base, files = list_source_files(src.path, TABLE_SUFFIXES[src.format])
    if not files:
        raise FileNotFoundError(f"data.source.path: no {src.format} files at {src.path}")
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=min(len(files), 64))
    rows = ds.map_batches(read_table_files, batch_size=1, fn_kwargs={
        "uri": src.path, "base": base, "fmt": src.format, "text": src.text,
        "id_column": src.id}).materialize()
    bad = rows.select_columns(["reject_reason"]).filter(
        lambda r: r["reject_reason"].startswith(SCHEMA)).take(5)
    if bad:
        problems = []
        for r in bad:
            field, _, message = r["reject_reason"][len(SCHEMA):].partition(": ")
            problems.append((field, message))
        raise SpecError(problems)
    info = {"source": {"kind": src.kind, "root": src.path, "include": [src.format],
                       "format": src.format, "text": src.text, "id": src.id, "files": len(files)}}
    return rows, len(files), info


# --------------------------------------------------------------------------- images
def decode_images(batch: dict[str, np.ndarray], base: str, classes: list[str], size: int,
                  channels: int) -> dict[str, np.ndarray]:
    """Ray Data task: image bytes -> ``{id, inputs [C, H, W] float32 in [0, 1], labels,
    sha256, reject_reason}``; a file that does not decode is a rejected row, not an error."""
    import io

    from PIL import Image

    index = {name: i for i, name in enumerate(classes)}
    ids, inputs, labels, hashes, reasons = [], [], [], [], []
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        rel = path[len(base):].lstrip("/")
        parts = rel.split("/")
        reason, x = "", np.zeros((channels, size, size), dtype=np.float32)
        if len(parts) < 2:
            reason = "incomplete: no class folder (images go in <path>/<class>/)"
        else:
            try:
                with Image.open(io.BytesIO(bytes(data))) as img:
                    img = img.convert("L" if channels == 1 else "RGB")
                    img = img.resize((size, size), Image.Resampling.BILINEAR)
                    pixels = np.asarray(img, dtype=np.float32) / 255.0
                x = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
                x = np.ascontiguousarray(x, dtype=np.float32)
            except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
                message = " ".join(str(exc).split())[:200]
                reason = f"incomplete: undecodable image ({exc.__class__.__name__}: {message})"
        ids.append(rel)
        inputs.append(x)
        labels.append(index.get(parts[0], -1) if len(parts) > 1 else -1)
        hashes.append(hashlib.sha256(bytes(data)).hexdigest())
        reasons.append(reason)
    return {"id": np.array(ids, dtype=object), "inputs": np.stack(inputs) if inputs else
            np.zeros((0, channels, size, size), np.float32),
            "labels": np.array(labels, dtype=np.int64), "sha256": np.array(hashes, dtype=object),
            "reject_reason": np.array(reasons, dtype=object)}


def image_folder_rows(src: Any) -> tuple[Any, list[str], int]:
    """The ``image_folder`` source as a materialized Ray Dataset of decoded rows (with
    ``sha256`` and ``reject_reason`` columns); returns (rows, class names, files)."""
    import ray

    fs, base, files = list_source_files(src.path, IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"data.source.path: no {'/'.join(IMAGE_SUFFIXES)} images under "
                                f"{src.path}")
    classes = sorted({f[len(base):].lstrip("/").split("/")[0] for f in files
                      if "/" in f[len(base):].lstrip("/")})
    ds = ray.data.read_binary_files(files, filesystem=fs, include_paths=True,
                                    override_num_blocks=min(len(files), 64))
    rows = ds.map_batches(decode_images, batch_size=256, fn_kwargs={
        "base": base, "classes": classes, "size": src.image_size,
        "channels": src.channels}).materialize()
    return rows, classes, len(files)
