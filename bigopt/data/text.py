"""Text corpora as Ray Data transforms: list files, read + validate, tokenize into windows.

The tokenizer is UTF-8 bytes (vocab 256): it needs nothing from a hub, loses nothing, and is
what small code models are often trained on. A file becomes ``ceil((n_bytes) / context)``
windows of ``context`` inputs and labels; the last window of a file is padded with byte 0
(NUL, which never appears in source text) and its padded labels are ``IGNORE_INDEX`` so no
token is dropped and padding is never learned.
"""

from __future__ import annotations

import fnmatch
import os
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

IGNORE_INDEX = -100
PAD_TOKEN = 0


def resolve_root(path: str) -> Path | str:
    """``stdlib`` means this interpreter's standard library sources, a corpus every Python has;
    an ``s3://`` prefix stays a URI (read through pyarrow's S3 filesystem)."""
    if path.startswith("s3://"):
        return path.rstrip("/")
    return Path(sysconfig.get_paths()["stdlib"]) if path == "stdlib" else Path(path).expanduser()


def _selected(rel: str, include: list[str], exclude: list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) for p in include) and not any(
        fnmatch.fnmatch(rel, p) or rel.startswith(p.rstrip("*")) for p in exclude)


def list_files(
    root: Path | str, include: list[str], exclude: list[str], max_files: int | None = None
) -> list[str]:
    """Relative paths under ``root`` (a directory or an ``s3://`` prefix) matching ``include``
    and not ``exclude``, sorted."""
    if isinstance(root, str) and root.startswith("s3://"):
        from pyarrow import fs as pafs

        from bigopt.runtime import filesystem_for

        fs, base = filesystem_for(root)
        entries = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        found = [rel for e in entries if e.type == pafs.FileType.File
                 and _selected(rel := e.path[len(base):].lstrip("/"), include, exclude)]
    else:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.source.path: {root} is not a directory")
        found = []
        base = len(str(root).rstrip(os.sep)) + 1
        prefixes = tuple(p.rstrip("*") for p in exclude)
        for dirpath, dirnames, filenames in os.walk(root):
            here = dirpath[base:].replace(os.sep, "/")
            here = f"{here}/" if here else ""
            # a directory whose every file an exclude prefix rejects is not walked at all (the
            # stdlib's site-packages: ~50k files, most of the listing time)
            dirnames[:] = sorted(d for d in dirnames if not f"{here}{d}/".startswith(prefixes))
            for name in filenames:
                rel = here + name
                if _selected(rel, include, exclude):
                    found.append(rel)
    found.sort()
    return found[:max_files] if max_files else found


def read_and_check(batch: dict[str, np.ndarray], root: str, max_bytes: int) -> dict[str, Any]:
    """Read each file; a row is kept or rejected with a reason, never dropped."""
    texts, reasons = [], []
    fs = None
    if root.startswith("s3://"):
        from bigopt.runtime import filesystem_for

        fs, base = filesystem_for(root)
    for rel in batch["path"]:
        reason, data = "", b""
        try:
            if fs is None:
                data = (Path(root) / rel).read_bytes()
            else:
                with fs.open_input_stream(f"{base}/{rel}", compression=None) as f:
                    data = f.read()
        except OSError as exc:
            reason = f"unreadable: {exc.__class__.__name__}"
        if not reason:
            if len(data) > max_bytes:
                reason = f"too_large: {len(data)} bytes > {max_bytes}"
            elif not data.strip():
                reason = "empty"
            elif b"\x00" in data:
                reason = "binary: contains NUL bytes"
            else:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    reason = "not_utf8"
        texts.append(b"" if reason else data)
        reasons.append(reason)
    return {"path": batch["path"], "text": np.array(texts, dtype=object), "reject_reason": reasons}


def token_dtype(vocab_size: int) -> type:
    """The integer type of the windows' ``input_ids``/``labels``: int16 when every id (and
    ``IGNORE_INDEX``) fits, which halves the shards, the object store's copies of them and the
    bytes every epoch reads (the byte tokenizer: always); int32 for larger vocabularies.
    Whatever reads them casts to int64 (``bigopt.data.ingest.model_input``, ``.long()``)."""
    return np.int16 if vocab_size <= np.iinfo(np.int16).max else np.int32


def to_windows(batch: dict[str, np.ndarray], context: int,
               tokenizer_json: str | None = None, vocab_size: int = 256) -> dict[str, np.ndarray]:
    """Files -> fixed windows: ``input_ids``/``labels`` of shape [context], one row each, of
    ``token_dtype(vocab_size)``. Tokens are the UTF-8 bytes, or a trained BPE's ids when
    ``tokenizer_json`` is given (``vocab_size`` is then that tokenizer's)."""
    dtype = token_dtype(vocab_size)
    inputs, labels, paths, splits, n_tokens, window = [], [], [], [], [], []
    if tokenizer_json is not None:
        from bigopt.data.tokenizer import encode

        ids = list(encode([bytes(t).decode("utf-8", "replace") for t in batch["text"]],
                          tokenizer_json))
    for i, (rel, text, split) in enumerate(zip(batch["path"], batch["text"], batch["split"],
                                               strict=True)):
        tokens = (np.asarray(ids[i], dtype=np.int32) if tokenizer_json is not None
                  else np.frombuffer(text, dtype=np.uint8).astype(np.int32))
        # Stride `context`; the window's labels are the next token, so window k reads
        # tokens[k*context : k*context + context + 1]. Every label is predicted exactly once.
        # All of a file's windows at once: the tokens laid out on a padded grid, inputs padded
        # with PAD_TOKEN and labels (shifted by one) with IGNORE_INDEX past the file's end.
        n = -(-max(len(tokens) - 1, 1) // context)
        grid_x = np.full(n * context + 1, PAD_TOKEN, dtype=dtype)
        grid_y = np.full(n * context + 1, IGNORE_INDEX, dtype=dtype)
        grid_x[: len(tokens)] = tokens
        grid_y[: len(tokens)] = tokens
        inputs.append(grid_x[: n * context].reshape(n, context))
        labels.append(grid_y[1:].reshape(n, context))
        starts = np.arange(n) * context
        n_tokens.append(np.minimum(context, len(tokens) - starts - 1).astype(np.int32))
        window.append(np.arange(n, dtype=np.int32))
        paths += [rel] * n
        splits += [split] * n
    return {
        "input_ids": np.concatenate(inputs) if inputs else np.zeros((0, context), dtype),
        "labels": np.concatenate(labels) if labels else np.zeros((0, context), dtype),
        "path": np.array(paths, dtype=object),
        "n_tokens": np.concatenate(n_tokens) if n_tokens else np.zeros(0, np.int32),
        # index within the file: a stable identity
        "window": np.concatenate(window) if window else np.zeros(0, np.int32),
        "split": np.array(splits, dtype=object),
    }

