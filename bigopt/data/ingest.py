"""Streaming Parquet shards from Ray Data into a training worker's step loop.

Two ways to hand data to workers:

* ``streaming`` (default): Ray Train's ``streaming_split`` gives each worker a disjoint stream,
  read in parallel with prefetch; fastest, but *which* rows reach which worker is decided at
  run time.
* ``deterministic``: the training split arrives as a ``bigopt.data.partition.ShardPlan`` and
  each data-parallel rank reads only its own share of an order fixed by the seed. Pipeline
  stages of one data-parallel group then see identical batches (DeepSpeed's pipeline engine
  requires it), and a resumed run sees exactly the batches the uninterrupted one would have.
  Validation data (small, read by every rank) is a materialized Dataset whose batches are
  dealt by rank.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from bigopt.data.partition import ShardPlan

Batch = tuple[torch.Tensor, torch.Tensor]


#: Read tasks per cluster CPU for a Ray Data read of prepared shards. Ray Data's own floor is 200
#: read tasks: on a small cluster their start-up and scheduling dominate (1.68M rows in 411 shards
#: on 2 CPUs: 200 tasks 9-12 s, 8-16 tasks 6 s; BENCHMARKS.md section 9). 1, 2 and 4 per CPU
#: read 1.68M rows alike (4.3-4.6 s); on a 14-shard split 2 per CPU is the quickest (0.31 s,
#: 4 per CPU 0.35 s; session 17). Blocks larger than Ray's target block size are still split,
#: so a large split still gets many blocks.
READ_TASKS_PER_CPU = 2


def read_shards(path: str, filesystem: Any = None, columns: list[str] | None = None) -> Any:
    """A Ray Data Dataset over prepared Parquet shards (local or S3), read the fast way.

    Ray 2.60 routes ``read_parquet`` through its new DataSourceV2 reader by default, which lists
    files and reads footers in actors and serializes every batch through its own pickling path:
    on the same 1.68M rows it took 30-44 s against 6-10 s for the V1 reader (BENCHMARKS.md
    section 9). The reader is chosen when the Dataset is made, so it is set for this call only.
    The Dataset runs without Ray Data's per-operator resource reservation (see below).
    """
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    try:
        ds = ray.data.read_parquet(path, filesystem=filesystem,
                                   override_num_blocks=max(2, READ_TASKS_PER_CPU * cpus))
    finally:
        ctx.use_datasource_v2 = saved
    # Ray's optimizer pushes the projection into the Parquet read (one ReadParquet operator)
    ds = ds.select_columns(columns) if columns else ds
    # Ray Data's per-operator resource reservation (on by default) kept this one-operator read
    # to one running read task at a time on a 2-CPU node, the other CPU idle (py-spy; 1.68M
    # rows: 5.2-5.9 s with it, 3.9-4.8 s without, BENCHMARKS.md section 9). The reservation
    # shares resources between the operators of a longer pipeline; here there is one. The
    # object store stays bounded without it (Ray Data's global limit: a consumer stalled for
    # 20 s held 1.46 GB of a 3.6 GB split). Set on this Dataset's own context only.
    ds.context.op_resource_reservation_enabled = False
    return ds


def model_input(x: torch.Tensor, float_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A batch's inputs as a model takes them: token ids as int64, floating inputs (images,
    features) in ``float_dtype`` when given (a DeepSpeed engine in bf16/fp16 holds its weights
    in that dtype and does not cast its inputs)."""
    if not torch.is_floating_point(x):
        return x.long()
    return x.to(float_dtype) if float_dtype is not None else x


def epoch_batches(shard: Any, *, batch_size: int, seed: int, dp: int = 1, dp_rank: int = 0,
                  shuffle_buffer: int = 0, columns: tuple[str, str] = ("input_ids", "labels"),
                  device: torch.device | None = None, augment: Any = None,
                  float_dtype: torch.dtype | None = None,
                  node_cache_bytes: int = 0) -> Iterator[Batch]:
    """Endless ``(inputs, targets)`` batches; each pass over the shard is a new epoch.

    ``shard`` a ``ShardPlan`` (deterministic training data): this rank reads its own share of
    an order fixed by ``seed`` (``bigopt.data.partition``). A Dataset: a local shuffle buffer
    reseeded per epoch gives a per-epoch shuffle that is still reproducible, and with
    ``dp > 1`` only every ``dp``-th batch is kept (validation data, read by every rank).
    Inputs go through ``model_input(x, float_dtype)``. ``node_cache_bytes`` > 0: remote shards
    of a ``ShardPlan`` go through this node's cache of that size (``bigopt.data.node_cache``).
    """
    if isinstance(shard, ShardPlan):
        from bigopt.data.node_cache import NodeCache

        cache = NodeCache(max_bytes=node_cache_bytes) if (
            node_cache_bytes > 0 and shard.uri.startswith("s3://")) else None
        return _rank_batches(shard, batch_size=batch_size, seed=seed, dp=dp, dp_rank=dp_rank,
                             shuffle_buffer=shuffle_buffer, columns=columns, device=device,
                             augment=augment, float_dtype=float_dtype, node_cache=cache)
    return _dataset_batches(shard, batch_size=batch_size, seed=seed, dp=dp, dp_rank=dp_rank,
                            shuffle_buffer=shuffle_buffer, columns=columns, device=device,
                            augment=augment, float_dtype=float_dtype)


class _RankBatches:
    """Tensor batches from a ``RankStream``; ``skip`` fast-forwards without reading whole
    epochs."""

    def __init__(self, stream: Any, columns: tuple[str, str], device: torch.device | None,
                 augment: Any, float_dtype: torch.dtype | None):
        self.stream, self.columns, self.device = stream, columns, device
        self.augment, self.float_dtype = augment, float_dtype

    def __iter__(self) -> _RankBatches:
        return self

    def __next__(self) -> Batch:
        x_col, y_col = self.columns
        batch = next(self.stream)
        if self.augment is not None:
            from bigopt.data.augment import OnTheFly

            batch = OnTheFly(self.augment, x_col,
                             epoch_seed=self.stream.seed + self.stream.epoch)(batch)
        x = model_input(torch.as_tensor(batch[x_col]), self.float_dtype)
        y = torch.as_tensor(batch[y_col]).long()
        return (x.to(self.device), y.to(self.device)) if self.device else (x, y)

    def skip(self, n: int) -> None:
        self.stream.skip(n)


def _rank_batches(plan: Any, *, batch_size: int, seed: int, dp: int, dp_rank: int,
                  shuffle_buffer: int, columns: tuple[str, str], device: torch.device | None,
                  augment: Any, float_dtype: torch.dtype | None, node_cache: Any) -> _RankBatches:
    from bigopt.data.partition import RankStream

    stream = RankStream(plan, batch_size=batch_size, seed=seed, dp=dp, dp_rank=dp_rank,
                        shuffle_buffer=shuffle_buffer, node_cache=node_cache)
    return _RankBatches(stream, columns, device, augment, float_dtype)


def _dataset_batches(shard: Any, *, batch_size: int, seed: int, dp: int, dp_rank: int,
                     shuffle_buffer: int, columns: tuple[str, str], device: torch.device | None,
                     augment: Any, float_dtype: torch.dtype | None) -> Iterator[Batch]:
    x_col, y_col = columns
    epoch = 0
    while True:
        kept = 0
        # A Dataset (deterministic mode) gets its block order shuffled per epoch, seeded; a
        # streaming shard's order is Ray's to decide.
        source = (shard.randomize_block_order(seed=seed + epoch)
                  if shuffle_buffer and hasattr(shard, "randomize_block_order") else shard)
        collate = None
        if augment is not None:  # on the fly: Ray Data's iterator threads augment each batch
            from bigopt.data.augment import OnTheFly

            collate = OnTheFly(augment, x_col, epoch_seed=seed + epoch)
        it = source.iter_torch_batches(
            batch_size=batch_size, drop_last=True, prefetch_batches=2,
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=(seed + epoch) if shuffle_buffer else None,
            **({"collate_fn": collate} if collate else {}),
        )
        for i, batch in enumerate(it):
            if i % dp != dp_rank:
                continue
            kept += 1
            x, y = batch[x_col], batch[y_col]
            x = model_input(x, float_dtype)
            yield (x.to(device) if device else x), (y.long().to(device) if device else y.long())
        if kept == 0:
            raise ValueError(
                f"the training data holds fewer than {batch_size * dp} rows per worker: lower "
                "train.batch_size or add data"
            )
        epoch += 1


class TimedBatches:
    """Wraps a batch iterator and accumulates the time the loop spent waiting on it."""

    def __init__(self, batches: Iterator[Batch]):
        self.batches, self.wait_s, self.consumed = batches, 0.0, 0

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> Batch:
        start = time.perf_counter()
        batch = next(self.batches)
        self.wait_s += time.perf_counter() - start
        self.consumed += 1
        return batch

    def take_wait(self) -> float:
        wait, self.wait_s = self.wait_s, 0.0
        return wait

    def skip(self, n: int) -> None:
        """Fast-forward ``n`` batches (resume in deterministic mode): by arithmetic over whole
        epochs when the batches come from a rank's own share, else by drawing them."""
        if hasattr(self.batches, "skip"):
            self.batches.skip(n)
        else:
            for _ in range(n):
                next(self.batches)
        self.consumed += n
