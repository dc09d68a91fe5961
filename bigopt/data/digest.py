"""The content digest of a data source (the fingerprint's ``source`` part), order-free.

Each row contributes ``sha256(key + NUL + sha256(content))`` read as a 256-bit integer; the
digest is the SHA-256 of their sum modulo 2^256 and the row count (an additive multiset hash).
A sum does not depend on the order rows arrive in, so the distributed path adds per-batch
partial sums inside Ray Data tasks and the driver adds a few numbers per batch, where a sorted
hash needed every row's key and content in the driver; the single-task path computes the same
value in its reader task.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

MOD = 2**256


def _as_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def row_sum(keys: Iterable[Any], contents: Iterable[Any]) -> tuple[int, int]:
    """(sum mod 2^256 of the rows' hashes, rows) of one batch."""
    total, rows = 0, 0
    for key, content in zip(keys, contents, strict=True):
        inner = hashlib.sha256(_as_bytes(content)).digest()
        total += int.from_bytes(hashlib.sha256(str(key).encode() + b"\0" + inner).digest(), "big")
        rows += 1
    return total % MOD, rows


def finish(total: int, rows: int) -> str:
    return hashlib.sha256(f"{total % MOD:064x}:{rows}".encode()).hexdigest()


def digest_of(keys: Iterable[Any], contents: Iterable[Any]) -> str:
    """The digest of rows held in one process."""
    return finish(*row_sum(keys, contents))


def _partial(batch: dict[str, np.ndarray], key: str, content: str) -> dict[str, np.ndarray]:
    total, rows = row_sum(batch[key], batch[content])
    return {"sum": np.array([f"{total:064x}"], dtype=object), "rows": np.array([rows])}


def dataset_digest(ds: Any, key: str, content: str) -> str:
    """The digest of a Ray Dataset: partial sums in its tasks, one small row per batch here."""
    total, rows = 0, 0
    parts = ds.select_columns([key, content]).map_batches(
        _partial, fn_kwargs={"key": key, "content": content}, batch_size=4096)
    for part in parts.iter_rows():
        total, rows = (total + int(part["sum"], 16)) % MOD, rows + int(part["rows"])
    return finish(total, rows)
