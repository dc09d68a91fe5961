"""bigopt.data.ingest: batches a training worker's loop gets from Ray Data."""

from __future__ import annotations

import numpy as np
import torch

from bigopt.data.ingest import epoch_batches


def test_float_inputs_take_the_engine_dtype_and_targets_stay_long(ray_session):
    """A DeepSpeed engine in bf16 (the CPU default) holds bf16 weights and does not cast its
    inputs: float features must arrive in bf16 (a digits MLP once failed its first forward
    with 'mat1 and mat2 must have the same dtype'); token ids stay integers either way."""
    import ray

    rows = [{"x": np.full(4, i, dtype=np.float32), "y": i % 3, "ids": np.arange(4) + i}
            for i in range(16)]
    ds = ray.data.from_items(rows)
    x, y = next(epoch_batches(ds, batch_size=4, seed=0, columns=("x", "y"),
                              float_dtype=torch.bfloat16))
    assert x.dtype == torch.bfloat16 and y.dtype == torch.long
    x, _ = next(epoch_batches(ds, batch_size=4, seed=0, columns=("x", "y")))
    assert x.dtype == torch.float32  # no engine dtype: as read
    ids, _ = next(epoch_batches(ds, batch_size=4, seed=0, columns=("ids", "y"),
                                float_dtype=torch.bfloat16))
    assert ids.dtype == torch.long


def test_read_shards_reads_every_row_in_few_tasks_and_leaves_the_context(ray_session, tmp_path):
    """``read_shards`` (the train split's Ray Data read) gives the rows pyarrow reads, asks for a
    few read tasks per CPU instead of Ray's 200 and its DataSourceV2 reader (5x slower on 1.68M
    rows, BENCHMARKS.md section 9) without Ray Data's per-operator reservation, and leaves the
    caller's reader choice and context as they were."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from bigopt.data.ingest import READ_TASKS_PER_CPU, read_shards

    for i in range(30):
        pq.write_table(pa.table({"input_ids": [[i, i + 1]] * 7, "labels": [i] * 7,
                                 "path": [f"f{i}"] * 7}), tmp_path / f"train-{i:05d}.parquet")
    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2, ctx.op_resource_reservation_enabled
    ds = read_shards(str(tmp_path), columns=["input_ids", "labels"])
    assert (ctx.use_datasource_v2, ctx.op_resource_reservation_enabled) == before
    # without the per-operator reservation (one read task at a time on 2 CPUs), on this
    # Dataset only: the session's context keeps Ray's setting for every other pipeline
    assert ds.context.op_resource_reservation_enabled is False
    got = ds.materialize()
    stats = got.stats()
    assert got.columns() == ["input_ids", "labels"]
    assert sorted(r["labels"] for r in got.take_all()) == sorted(i for i in range(30) for _ in range(7))
    cpus = int(ray.cluster_resources()["CPU"])
    # the V1 reader ("ReadParquet"; V2 lists files and reads footers first: "ListFiles")
    assert "ListFiles" not in stats
    assert f"ReadParquet: {min(30, max(2, READ_TASKS_PER_CPU * cpus))} tasks executed" in stats
