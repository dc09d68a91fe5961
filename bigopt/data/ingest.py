"""Streaming Parquet shards from Ray Data into a training worker's step loop.

Two ways to hand data to workers:

* ``streaming`` (default): Ray Train's ``streaming_split`` gives each worker a disjoint stream,
  read in parallel with prefetch; fastest, but *which* rows reach which worker is decided at
  run time.
* ``deterministic``: every worker iterates the dataset in one fixed order and keeps every
  ``dp``-th batch at offset ``dp_rank``. Pipeline stages of one data-parallel group then see
  identical batches (DeepSpeed's pipeline engine requires it), and a resumed run sees exactly
  the batches the uninterrupted one would have.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


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
                  float_dtype: torch.dtype | None = None) -> Iterator[Batch]:
    """Endless ``(inputs, targets)`` batches; each pass over the shard is a new epoch.

    A local shuffle buffer reseeded per epoch gives a per-epoch shuffle that is still
    reproducible. With ``dp > 1`` only every ``dp``-th batch is kept (deterministic mode).
    Inputs go through ``model_input(x, float_dtype)``.
    """
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
        """Fast-forward ``n`` batches (resume in deterministic mode)."""
        for _ in range(n):
            next(self.batches)
        self.consumed += n
