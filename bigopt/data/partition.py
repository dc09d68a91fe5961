"""The deterministic training order, with each data-parallel rank reading only its own part.

The driver reads the Parquet footers of the train split once (``plan_shards``: file paths and
the rows of each row group, no data). Each epoch every rank derives the same seeded permutation
of the row groups and takes its contiguous share of the permuted rows: rank ``r`` of ``dp`` gets
rows ``[r * n, (r + 1) * n)`` with ``n = total // dp``, so every rank makes the same number of
batches per epoch and no row is used twice. A rank then reads only the row groups its share
touches, straight from the shard files (pyarrow, on local disk or S3, in a prefetch thread:
no Ray task once training runs, see ``bigopt.train.stage.plan_splits``), and shuffles them
through a local buffer seeded by (seed, epoch, rank). A row group that straddles two ranks'
shares is read by both and used by each for its own rows: with ``G`` rows per row group a rank
reads at most ``n + 2 G`` rows per epoch.

Why not Ray Data here: iterating one materialized dataset in every rank and keeping every
``dp``-th batch (the previous deterministic mode) reads the whole split ``dp`` times and needs
it whole in the object store; ``streaming_split`` reads each row once but not reproducibly.
This keeps the order a function of (files, seed, epoch, dp, rank) alone, so the same spec gives
the same batches, a resume lands on the same batch, and pipeline stages of one data-parallel
group (same ``dp_rank``) see identical batches.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bigopt.data.node_cache import RemoteCounter

log = logging.getLogger("bigopt")

#: row groups a rank's reader thread reads ahead of the batches the loop takes
PREFETCH_ROW_GROUPS = 4
#: ready batches a rank's stream holds ahead of the training step
PREFETCH_BATCHES = 4
#: tries per row group before the error reaches the training loop, and the first backoff:
#: 0.5 + 1 + 2 + 4 + 8 + 16 s rides out a remote store restarting
READ_ATTEMPTS = 7
RETRY_FIRST_S = 0.5


#: a shard is written as at least this many row groups (bigger ones are not worth cutting)
ROW_GROUPS_PER_SHARD = 16
MIN_ROW_GROUP_ROWS = 128


def row_group_rows(rows_per_shard: int) -> int:
    """Rows per Parquet row group the data stage writes. A rank's share of an epoch starts and
    ends inside a row group, which it decodes whole, so a rank reads its share plus up to two
    row groups: ~16 per shard keep that within a few percent of the share, and a row group of
    128+ rows keeps Parquet's per-group overhead small."""
    return max(MIN_ROW_GROUP_ROWS, -(-rows_per_shard // ROW_GROUPS_PER_SHARD))


@dataclass(frozen=True)
class ShardPlan:
    """A split's Parquet files as the ranks read them: where they are and how many rows each
    row group holds (from the footers). Small and picklable: it travels in the loop config."""

    uri: str  # the split's root, local path or s3:// (decides the filesystem)
    files: tuple[str, ...]  # paths inside that filesystem, in shard-name order
    row_groups: tuple[tuple[int, ...], ...]  # rows of each row group, per file
    columns: tuple[str, ...]

    @property
    def total_rows(self) -> int:
        return sum(sum(groups) for groups in self.row_groups)

    def units(self) -> list[tuple[int, int, int]]:
        """(file index, row group index, rows) of every row group, in file order."""
        return [(f, g, rows) for f, groups in enumerate(self.row_groups)
                for g, rows in enumerate(groups)]


def plan_shards(uri: str, columns: list[str]) -> ShardPlan:
    """The plan of the split under ``uri``: footers only, no row data."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from bigopt.runtime import filesystem_for

    fs, path = filesystem_for(uri)
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet shards under {uri}")
    groups = []
    for f in files:
        with fs.open_input_file(f) as handle:
            meta = pq.ParquetFile(handle).metadata
            groups.append(tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups)))
    return ShardPlan(uri=uri, files=tuple(files), row_groups=tuple(groups), columns=tuple(columns))


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of one row group."""

    file: int
    group: int
    start: int
    stop: int


def rank_pieces(plan: ShardPlan, *, seed: int, epoch: int, dp: int, dp_rank: int,
                shuffle: bool = True) -> list[Piece]:
    """The row-group pieces rank ``dp_rank`` uses in ``epoch``: its contiguous share of the
    epoch's seeded permutation of row groups (the same permutation on every rank; file order
    when not ``shuffle``)."""
    units = plan.units()
    order = (np.random.default_rng([seed, epoch]).permutation(len(units)) if shuffle
             else np.arange(len(units)))
    share = plan.total_rows // dp
    lo, hi = dp_rank * share, (dp_rank + 1) * share
    pieces, offset = [], 0
    for i in order:
        f, g, rows = units[int(i)]
        start, stop = max(lo - offset, 0), min(hi - offset, rows)
        if start < stop:
            pieces.append(Piece(f, g, start, stop))
        offset += rows
        if offset >= hi:
            break
    return pieces


def batches_per_epoch(plan: ShardPlan, *, batch_size: int, dp: int) -> int:
    return (plan.total_rows // dp) // batch_size


@dataclass
class ReadCounter:
    """Rows this rank decoded (``read``) and used (``used``): the read amplification."""

    read: int = 0
    used: int = 0
    retries: int = 0  # failed reads tried again
    per_epoch: list[tuple[int, int]] = field(default_factory=list)  # (read, used) per epoch


class RankStream:
    """Endless ``{column: ndarray}`` batches of one rank's share, epoch after epoch.

    ``skip(n)`` fast-forwards ``n`` batches reading only the epoch it lands in (whole epochs
    are skipped by arithmetic: each has ``batches_per_epoch`` batches on every rank).
    """

    def __init__(self, plan: ShardPlan, *, batch_size: int, seed: int, dp: int = 1,
                 dp_rank: int = 0, shuffle_buffer: int = 0, node_cache: Any = None):
        if not 0 <= dp_rank < dp:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp - 1}")
        self.plan, self.batch_size, self.seed = plan, batch_size, seed
        self.dp, self.dp_rank, self.shuffle_buffer = dp, dp_rank, shuffle_buffer
        self.per_epoch = batches_per_epoch(plan, batch_size=batch_size, dp=dp)
        if self.per_epoch == 0:
            raise ValueError(
                f"the training data holds fewer than {batch_size * dp} rows ({plan.total_rows}): "
                "lower train.batch_size or add data")
        self.counter = ReadCounter()
        # remote shards: through this node's cache (bigopt.data.node_cache) when given
        self.node_cache = node_cache if plan.uri.startswith("s3://") else None
        self.remote = RemoteCounter()
        self.epoch = 0  # the epoch of the batch last returned
        self._epochs = self._from(epoch=0)

    def __iter__(self) -> RankStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self.epoch, batch = next(self._epochs)
        return batch

    def close(self) -> None:
        """Stops the reader thread (it reads ahead while the stream is alive)."""
        self._epochs.close()

    def skip(self, n: int) -> None:
        epoch, within = divmod(n, self.per_epoch)
        self._epochs.close()  # stops the reader thread of the epoch in progress
        self._epochs = self._from(epoch=epoch)
        for _ in range(within):
            next(self._epochs)

    def _from(self, epoch: int) -> _Prefetched:
        def epochs() -> Iterator[tuple[int, dict[str, np.ndarray]]]:
            at = epoch
            while True:
                for batch in self._epoch(at):
                    yield at, batch
                at += 1

        return _Prefetched(epochs(), PREFETCH_BATCHES)

    def _epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        pieces = rank_pieces(self.plan, seed=self.seed, epoch=epoch, dp=self.dp,
                             dp_rank=self.dp_rank, shuffle=self.shuffle_buffer > 0)
        rng = np.random.default_rng([self.seed, epoch, self.dp_rank])
        read_before, used_before = self.counter.read, self.counter.used
        buffer: dict[str, np.ndarray] | None = None
        made = 0
        remote_before = self.remote.snapshot()
        pieces_in = _PieceReader(self.plan, pieces, self.counter, self.remote, self.node_cache)
        reader = _Prefetched(pieces_in.chunks(), PREFETCH_ROW_GROUPS, "bigopt-rank-reader",
                             pieces_in.stopped)
        try:
            for chunk in reader:
                buffer = {k: v.copy() for k, v in chunk.items()} if buffer is None else {
                    k: np.concatenate([buffer[k], chunk[k]]) for k in buffer}
                while made < self.per_epoch and _rows(buffer) >= self.shuffle_buffer + self.batch_size:
                    batch, buffer = self._take(buffer, rng)
                    made += 1
                    yield batch
            while made < self.per_epoch:  # the epoch's tail: the buffer drains
                assert buffer is not None and _rows(buffer) >= self.batch_size
                batch, buffer = self._take(buffer, rng)
                made += 1
                yield batch
        finally:
            reader.close(wait_s=0)  # a read in flight ends on its own (the thread is a daemon)
        self.counter.per_epoch.append((self.counter.read - read_before,
                                       self.counter.used - used_before))
        if self.plan.uri.startswith("s3://"):
            now = self.remote.snapshot()
            self.remote.per_epoch.append({k: now[k] - remote_before[k] for k in now})

    def _take(self, buffer: dict[str, np.ndarray],
              rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        n = _rows(buffer)
        if self.shuffle_buffer:
            b = self.batch_size
            chosen = rng.choice(n, size=b, replace=False)
            batch = {k: v[chosen] for k, v in buffer.items()}
            # the holes the batch leaves are filled from the buffer's tail: O(batch) per batch
            tail = np.setdiff1d(np.arange(n - b, n), chosen, assume_unique=True)
            holes = chosen[chosen < n - b]
            for v in buffer.values():
                v[holes] = v[tail]
            return batch, {k: v[:n - b] for k, v in buffer.items()}
        return ({k: v[:self.batch_size] for k, v in buffer.items()},
                {k: v[self.batch_size:] for k, v in buffer.items()})


def _rows(buffer: dict[str, np.ndarray]) -> int:
    return len(next(iter(buffer.values())))


class _Prefetched:
    """An iterator run ``depth`` items ahead in a background thread: the row-group reads, and
    the shuffle buffer's concatenations and gathers (milliseconds per batch for image rows),
    overlap the training step instead of counting as data wait. One producer thread, so the order is the
    iterator's own; ``close`` stops it between items and closes the iterator there."""

    _DONE = object()

    def __init__(self, items: Iterator[Any], depth: int, name: str = "bigopt-batch-prefetch",
                 stopped: threading.Event | None = None):
        self.items = items
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        # the producer may watch this too (a reader's retry backoff ends at close)
        self.stopped = stopped or threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.items:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            self._put(exc)
        finally:
            self.items.close()  # in this thread: the generator's finally (reader threads) runs

    def _put(self, item: Any) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> _Prefetched:
        return self

    def __next__(self) -> Any:
        item = self.queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, wait_s: float = 60.0) -> None:
        """Stop the producer; wait up to ``wait_s`` for it to close its iterator."""
        self.stopped.set()
        self.thread.join(timeout=wait_s)


class _PieceReader:
    """Reads a rank's pieces in order (``chunks``; run ``PREFETCH_ROW_GROUPS`` ahead in a
    ``_Prefetched`` thread by the stream)."""

    def __init__(self, plan: ShardPlan, pieces: list[Piece], counter: ReadCounter,
                 remote: RemoteCounter, node_cache: Any):
        self.plan, self.pieces, self.counter = plan, pieces, counter
        self.remote, self.node_cache = remote, node_cache
        self._local: dict[str, str] = {}  # this epoch's node-cache paths, by remote path
        self.stopped = threading.Event()  # set when the stream closes: no more retries

    def chunks(self) -> Iterator[dict[str, np.ndarray]]:
        # Ray Data's own Arrow -> NumPy conversion (importing it registers the tensor extension
        # type, so Parquet tensor columns come back as (rows, *shape) arrays)
        from ray.data.block import BlockAccessor

        from bigopt.runtime import filesystem_for

        fs, _ = filesystem_for(self.plan.uri)
        for piece in self.pieces:
            table = self._read_with_retries(fs, piece)
            self.counter.read += table.num_rows
            table = table.slice(piece.start, piece.stop - piece.start)
            self.counter.used += table.num_rows
            yield BlockAccessor.for_block(table).to_batch_format("numpy")

    def _read_with_retries(self, fs: Any, piece: Piece) -> Any:
        """A piece is read whole or not at all, so a retry after a failed read (a remote store
        restarting, a dropped connection) neither loses nor repeats a row. Backoff doubles
        from ``RETRY_FIRST_S``; the last error is raised after ``READ_ATTEMPTS`` tries."""
        for attempt in range(READ_ATTEMPTS):
            try:
                return self._read(fs, piece)
            except OSError as exc:  # pyarrow's IO errors, S3's included
                if (isinstance(exc, FileNotFoundError) or attempt == READ_ATTEMPTS - 1
                        or self.stopped.is_set()):  # a missing shard is not transient
                    raise
                self.counter.retries += 1
                wait = RETRY_FIRST_S * 2**attempt
                log.warning("reading %s row group %d failed (%s): retry %d in %.1f s",
                            self.plan.files[piece.file], piece.group, exc, attempt + 1, wait)
                if self.stopped.wait(wait):  # the stream closed meanwhile
                    raise
        raise AssertionError("unreachable")

    def _read(self, fs: Any, piece: Piece) -> Any:
        import pyarrow.parquet as pq

        path = self.plan.files[piece.file]
        columns = list(self.plan.columns)
        if self.node_cache is not None:
            # one lookup per file per epoch (a HEAD to S3 keys the entry), not per row group
            local = self._local.get(path)
            if local is None or not os.path.exists(local):  # new, or evicted since: (re)fetch
                local = self._local[path] = self.node_cache.local_path(
                    fs, path, f"s3://{path}", self.remote)
            return pq.ParquetFile(local).read_row_group(piece.group, columns=columns)
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            table = parquet.read_row_group(piece.group, columns=columns)
            if self.plan.uri.startswith("s3://"):  # ranged GETs of the row group's chunks
                group = parquet.metadata.row_group(piece.group)
                self.remote.gets += 1
                self.remote.bytes += group.total_byte_size
        return table

