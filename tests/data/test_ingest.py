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
