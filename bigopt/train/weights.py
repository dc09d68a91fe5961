"""Rebuild a trained model from a checkpoint written by any strategy (DDP, ZeRO 0-3, pipeline).

The compress and export stages, and the strategy-equivalence tests, need the plain
``nn.Module`` whatever produced it. These are the run's own checkpoint files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from bigopt.models import from_arch
from bigopt.train.engine import DeepSpeedCheckpointing


def _load(path: str) -> dict:
    # weights_only: tensors and plain containers only, even for our own files.
    return torch.load(path, map_location="cpu", weights_only=True)


def load_trained_model(arch: Mapping[str, Any], checkpoint_dir: str) -> nn.Module:
    """The model ``arch`` describes (a model artifact's or resolved job's ``arch``) with the
    weights of ``checkpoint_dir`` (a local directory), in fp32."""
    model = from_arch(arch).float()
    ds_dir = os.path.join(checkpoint_dir, DeepSpeedCheckpointing.TAG)
    if os.path.exists(os.path.join(checkpoint_dir, "ddp_state.pt")):
        model.load_state_dict(_load(os.path.join(checkpoint_dir, "ddp_state.pt"))["model"])
    elif os.path.exists(os.path.join(ds_dir, "layer_00-model_states.pt")):
        # Pipeline checkpoints hold one file per layer of model.layers().
        for i, layer in enumerate(model.layers()):
            path = os.path.join(ds_dir, f"layer_{i:02d}-model_states.pt")
            if os.path.exists(path):  # parameter-free layers are not saved
                layer.load_state_dict(_load(path))
    elif any(f.startswith(("zero_pp_rank", "bf16_zero_pp_rank")) for f in os.listdir(ds_dir)):
        # ZeRO 1-3 (and bf16): the fp32 master weights live in the optimizer shards.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DeepSpeedCheckpointing.TAG)
        model.load_state_dict({k: v.float() for k, v in state.items()})
    else:
        state = _load(os.path.join(ds_dir, "mp_rank_00_model_states.pt"))["module"]
        model.load_state_dict({k: v.float() for k, v in state.items()})
    return model
