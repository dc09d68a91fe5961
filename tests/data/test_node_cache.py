"""The node-local cache of s3:// shards, against a real S3-protocol server (moto_server on
127.0.0.1, or the endpoint in BIGOPT_TEST_S3_ENDPOINT)."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bigopt.data.node_cache import NodeCache, RemoteCounter
from bigopt.data.partition import RankStream, plan_shards
from bigopt.runtime import filesystem_for


@pytest.fixture
def s3_split(s3_server):
    """4 shards of 500 rows (2 row groups each) under a fresh s3:// prefix."""
    uri = f"{s3_server}/node-cache/{uuid.uuid4().hex[:8]}/train"
    fs, path = filesystem_for(uri)
    for i in range(4):
        ids = np.arange(i * 500, (i + 1) * 500)
        with fs.open_output_stream(f"{path}/train-{i:05d}-0.parquet") as out:
            pq.write_table(pa.table({"id": ids, "y": ids % 7}), out, row_group_size=250)
    return uri


def ids(stream: RankStream, n: int) -> np.ndarray:
    return np.concatenate([next(stream)["id"] for _ in range(n)])


def test_second_epoch_reads_locally_and_batches_are_unchanged(s3_split, tmp_path):
    plan = plan_shards(s3_split, ["id"])
    cached = RankStream(plan, batch_size=10, seed=0, shuffle_buffer=50,
                        node_cache=NodeCache(str(tmp_path / "cache")))
    direct = RankStream(plan, batch_size=10, seed=0, shuffle_buffer=50)
    per_epoch = cached.per_epoch
    assert (ids(cached, 2 * per_epoch + 1) == ids(direct, 2 * per_epoch + 1)).all()
    first, second = cached.remote.per_epoch[:2]
    assert first["gets"] == 4 and first["bytes"] > 0  # each shard fetched once, whole
    assert second["gets"] == 0 and second["hits"] == 4  # 4 files (8 row groups), all local
    assert direct.remote.per_epoch[1]["gets"] == 8  # without the cache: S3 again every epoch
    # a later run on the same node (a new process: a new cache object) reads nothing remote
    again = RankStream(plan, batch_size=10, seed=0, shuffle_buffer=50,
                       node_cache=NodeCache(str(tmp_path / "cache")))
    ids(again, per_epoch + 1)
    assert again.remote.gets == 0


def test_a_damaged_entry_is_fetched_again_and_a_rewritten_object_is_a_new_entry(s3_split, tmp_path):
    fs, path = filesystem_for(s3_split)
    shard = f"{path}/train-00000-0.parquet"
    cache, counter = NodeCache(str(tmp_path)), RemoteCounter()
    local = cache.local_path(fs, shard, f"s3://{shard}", counter)
    with open(local, "r+b") as f:  # same size, one byte changed: only the hash can tell
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    fresh = NodeCache(str(tmp_path))  # another process: hashes each entry once
    assert fresh.local_path(fs, shard, f"s3://{shard}", counter) == local
    assert counter.gets == 2 and pq.read_table(local).num_rows == 500
    with fs.open_output_stream(shard) as out:  # the object rewritten with other rows
        pq.write_table(pa.table({"id": np.arange(10), "y": np.arange(10)}), out)
    other = fresh.local_path(fs, shard, f"s3://{shard}", counter)
    assert other != local and pq.read_table(other).num_rows == 10 and counter.gets == 3


def test_least_recently_used_entries_are_evicted_past_the_bound(s3_split, tmp_path):
    fs, path = filesystem_for(s3_split)
    shards = [f"{path}/train-{i:05d}-0.parquet" for i in range(4)]
    size = fs.get_file_info(shards[0]).size
    cache, counter = NodeCache(str(tmp_path), max_bytes=int(2.5 * size)), RemoteCounter()
    first = cache.local_path(fs, shards[0], f"s3://{shards[0]}", counter)
    second = cache.local_path(fs, shards[1], f"s3://{shards[1]}", counter)
    os.utime(second, (1, 1))  # shard 1 used longest ago; shard 0 is then used again
    cache.local_path(fs, shards[0], f"s3://{shards[0]}", counter)
    cache.local_path(fs, shards[2], f"s3://{shards[2]}", counter)
    kept = {p for p, _, _ in cache.entries()}
    assert first in kept and second not in kept and len(kept) == 2
    assert sum(s for _, s, _ in cache.entries()) <= 2.5 * size


@pytest.mark.parametrize("cached", [False, True])
def test_a_store_restarting_mid_read_loses_and_repeats_no_row(s3_split, tmp_path, monkeypatch, cached):
    """The S3 endpoint goes away mid-epoch (connections reset, then refused for 6 s: longer than
    the AWS SDK's own retries) and comes back: the stream retries with backoff and yields
    exactly the batches of an undisturbed one."""
    import threading
    from urllib.parse import urlparse

    from factories import TcpProxy

    plan = plan_shards(s3_split, ["id"])
    expected = ids(RankStream(plan, batch_size=10, seed=0, shuffle_buffer=50), 200)
    server = urlparse(os.environ["AWS_ENDPOINT_URL"])
    proxy = TcpProxy((server.hostname, server.port))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    # one try per S3 request: the outage reaches the stream, whose own retries are under test
    # (the AWS SDK's, bigopt.runtime.S3_MAX_ATTEMPTS, ride out 6 s on their own)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    stream = RankStream(plan, batch_size=10, seed=0, shuffle_buffer=50,
                        node_cache=NodeCache(str(tmp_path)) if cached else None)
    got = [ids(stream, 20)]
    proxy.stop()  # mid-epoch: the reader thread is fetching ahead
    threading.Timer(6.0, proxy.start).start()
    # the rest of the epoch: past what the reader and batch threads had fetched ahead
    got.append(ids(stream, 180))
    retries = stream.counter.retries
    proxy.stop()
    assert (np.concatenate(got) == expected).all()
    assert retries >= 1
    seen = np.concatenate(got)  # the epoch's 200 batches: no row twice
    assert len(np.unique(seen)) == len(seen)
