"""A node-local cache of remote (``s3://``) shard files: the second epoch, and later runs on
the same node, read them from local disk.

One directory per node (``BIGOPT_NODE_CACHE``, default ``~/.cache/bigopt/shards``), shared by
every worker process there. An entry is a whole shard file named by a hash of its URI, size and
modification time (an S3 object's ``LastModified``: a rewritten object is a new entry), plus a
JSON sidecar with its SHA-256. Downloads go to a temporary name and are renamed into place
after the hash is taken, under a per-entry file lock, so two workers never fetch the same file
twice and a reader never sees half a file. An entry whose size or hash no longer matches its
sidecar (a truncated disk, a stray edit) is dropped and fetched again. Least-recently-used
entries are evicted past ``max_bytes``.

Remote traffic is counted (``RemoteCounter``): each fetch is one GET of the whole object.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

DEFAULT_DIR = os.path.join("~", ".cache", "bigopt", "shards")
CHUNK = 8 * 2**20


def cache_dir() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("BIGOPT_NODE_CACHE", DEFAULT_DIR)))


@dataclass
class RemoteCounter:
    """GETs issued to the remote store and bytes they returned; hits served from local disk."""

    gets: int = 0
    bytes: int = 0
    hits: int = 0
    per_epoch: list[dict[str, int]] = field(default_factory=list)

    def snapshot(self) -> dict[str, int]:
        return {"gets": self.gets, "bytes": self.bytes, "hits": self.hits}


class NodeCache:
    """Whole-file cache of remote shards on this node's disk, bounded to ``max_bytes``."""

    def __init__(self, root: str | None = None, max_bytes: int = 20 * 2**30):
        self.root, self.max_bytes = root or cache_dir(), max_bytes
        os.makedirs(self.root, exist_ok=True)
        self._verified: set[str] = set()  # entries hashed once by this process

    def local_path(self, fs: Any, path: str, uri: str, counter: RemoteCounter) -> str:
        """The local copy of ``path`` in ``fs`` (``uri`` names it), fetched if needed."""
        import pyarrow.fs as pafs

        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(uri)
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        key = hashlib.sha256(f"{uri}\0{info.size}\0{mtime}".encode()).hexdigest()[:32]
        data, meta = os.path.join(self.root, key + ".parquet"), os.path.join(self.root, key + ".json")
        with self._locked(key):
            if self._valid(data, meta, info.size):
                os.utime(data)  # LRU: last use
                counter.hits += 1
                return data
            tmp = f"{data}.{os.getpid()}.tmp"
            digest = hashlib.sha256()
            try:
                with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
                    counter.gets += 1
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
                        counter.bytes += len(chunk)
            except BaseException:  # a broken download leaves no partial file behind
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            fetched = os.path.getsize(tmp)
            if fetched != info.size:
                os.unlink(tmp)
                raise OSError(f"{uri}: fetched {fetched} bytes, expected {info.size}")
            with open(meta + ".tmp", "w") as f:
                json.dump({"uri": uri, "size": info.size, "mtime_ns": mtime,
                           "sha256": digest.hexdigest(), "fetched": time.time()}, f)
            os.replace(tmp, data)  # data first: a sidecar always describes a whole file
            os.replace(meta + ".tmp", meta)
            self._verified.add(data)
        self.evict()
        return data

    def _valid(self, data: str, meta: str, size: int) -> bool:
        if not (os.path.exists(data) and os.path.exists(meta)):
            return False
        try:
            with open(meta) as f:
                expected = json.load(f)
        except (OSError, ValueError):
            expected = {}
        ok = expected.get("size") == size == os.path.getsize(data)
        if ok and data not in self._verified:  # hashed once per process: catches a bad copy
            ok = _sha256(data) == expected.get("sha256")
        if not ok:
            for p in (data, meta):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            return False
        self._verified.add(data)
        return True

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        with open(os.path.join(self.root, key + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def entries(self) -> list[tuple[str, int, float]]:
        """(data path, bytes, last use) of every whole entry, least recently used first."""
        out = []
        for name in os.listdir(self.root):
            if name.endswith(".parquet"):
                p = os.path.join(self.root, name)
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(p)
                    out.append((p, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e[2])

    def evict(self) -> int:
        """Drops least-recently-used entries until the cache fits ``max_bytes``; returns how
        many were dropped."""
        entries = self.entries()
        total, dropped = sum(size for _, size, _ in entries), 0
        for data, size, _ in entries:
            if total <= self.max_bytes:
                break
            for p in (data, data[:-len(".parquet")] + ".json"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            self._verified.discard(data)
            total -= size
            dropped += 1
        return dropped


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
