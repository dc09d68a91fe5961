"""The deterministic order with each data-parallel rank reading only its share (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bigopt.data.partition import RankStream, plan_shards, rank_pieces

# uneven shards and row groups, as a data stage with a remainder shard writes them
SHARDS = [(0, 1000, 250), (1000, 1900, 300), (1900, 2203, 128)]  # first id, end, row group


@pytest.fixture
def split(tmp_path):
    """Parquet shards of 2,203 rows: an id, a label and a (2, 3) tensor column stored as Ray
    Data stores it (a flat list with the shape in the field's extension metadata)."""
    tensor = pa.field("x", pa.large_list(pa.float32()), metadata={
        "ARROW:extension:name": "ray.data.arrow_tensor_v2", "ARROW:extension:metadata": "[2, 3]"})
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("y", pa.int64()), tensor])
    for i, (lo, hi, group) in enumerate(SHARDS):
        ids = np.arange(lo, hi)
        x = pa.array([np.full(6, v, dtype=np.float32) for v in ids], type=pa.large_list(pa.float32()))
        table = pa.table({"id": ids, "y": ids % 10, "x": x}, schema=schema)
        pq.write_table(table, tmp_path / f"train-{i:05d}-0.parquet", row_group_size=group)
    return str(tmp_path)


def ids_of(stream: RankStream, batches: int) -> np.ndarray:
    return np.concatenate([next(stream)["id"] for _ in range(batches)])


def test_plan_reads_footers_and_tensor_columns_keep_their_shape(split):
    plan = plan_shards(split, ["id", "x"])
    assert plan.total_rows == 2203 and plan.row_groups[0] == (250,) * 4
    batch = next(RankStream(plan, batch_size=8, seed=0))
    assert batch["x"].shape == (8, 2, 3) and (batch["x"][:, 1, 2] == batch["id"]).all()


@pytest.mark.parametrize("dp", [2, 3])
def test_each_rank_reads_only_its_share_and_the_shares_cover_the_epoch_once(split, dp):
    plan = plan_shards(split, ["id"])
    streams = [RankStream(plan, batch_size=16, seed=7, dp=dp, dp_rank=r, shuffle_buffer=64)
               for r in range(dp)]
    per_epoch = streams[0].per_epoch
    assert per_epoch == (2203 // dp) // 16 and all(s.per_epoch == per_epoch for s in streams)
    for _ in range(2):  # two epochs
        seen = np.concatenate([ids_of(s, per_epoch) for s in streams])
        assert len(np.unique(seen)) == len(seen)  # no row twice in an epoch, across ranks
        assert len(seen) > 0.95 * 2203
    for s in streams:
        next(s)  # into epoch 3: epochs 1-2's counts are booked
        for read, used in s.counter.per_epoch:
            # a rank uses exactly its share and decodes at most two straddling row groups more
            assert used == 2203 // dp and read <= used + 2 * 300


def test_same_seed_same_batches_other_seed_or_epoch_another_order(split):
    plan = plan_shards(split, ["id"])
    a = ids_of(RankStream(plan, batch_size=16, seed=1, dp=2, dp_rank=1, shuffle_buffer=100), 80)
    b = ids_of(RankStream(plan, batch_size=16, seed=1, dp=2, dp_rank=1, shuffle_buffer=100), 80)
    c = ids_of(RankStream(plan, batch_size=16, seed=2, dp=2, dp_rank=1, shuffle_buffer=100), 80)
    assert (a == b).all() and not (a == c).all()
    per_epoch = (2203 // 2) // 16
    assert not (a[:16] == a[per_epoch * 16:per_epoch * 16 + 16]).all()  # epoch 2 reshuffled
    in_order = ids_of(RankStream(plan, batch_size=16, seed=1), 3)  # shuffle_buffer 0
    assert (in_order == np.arange(48)).all()


def test_skip_lands_on_the_batch_an_uninterrupted_stream_reaches(split):
    plan = plan_shards(split, ["id"])
    whole = RankStream(plan, batch_size=16, seed=3, dp=2, dp_rank=0, shuffle_buffer=64)
    expected = ids_of(whole, 160)[150 * 16:]
    resumed = RankStream(plan, batch_size=16, seed=3, dp=2, dp_rank=0, shuffle_buffer=64)
    resumed.skip(150)  # past epoch 1's 68 batches and epoch 2's: into epoch 3
    assert (ids_of(resumed, 10) == expected).all()
    assert resumed.counter.read < whole.counter.read / 2  # whole epochs skipped unread


def test_ranks_of_one_pipeline_group_see_identical_batches_and_pieces_are_seeded(split):
    plan = plan_shards(split, ["id"])
    stage0 = ids_of(RankStream(plan, batch_size=8, seed=0, dp=2, dp_rank=1, shuffle_buffer=32), 20)
    stage1 = ids_of(RankStream(plan, batch_size=8, seed=0, dp=2, dp_rank=1, shuffle_buffer=32), 20)
    assert (stage0 == stage1).all()
    assert rank_pieces(plan, seed=0, epoch=0, dp=2, dp_rank=0) != rank_pieces(
        plan, seed=0, epoch=1, dp=2, dp_rank=0)


def test_too_little_data_for_one_batch_per_rank_is_a_clear_error(split):
    with pytest.raises(ValueError, match="fewer than"):
        RankStream(plan_shards(split, ["id"]), batch_size=2000, seed=0, dp=2)
