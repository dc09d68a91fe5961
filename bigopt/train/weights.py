"""Consolidate a trained model's weights from a checkpoint written by any strategy (DDP, ZeRO
0-3, pipeline), and write them as ``model.safetensors``.

Runs where the checkpoint was written (rank 0 of the run that wrote it): DeepSpeed's
``zero_to_fp32`` reads its own optimizer shards, which hold pickled Python objects, so these
files are only ever read here, by the run that made them. Everyone else loads the
safetensors file (``bigopt.load_model``): tensors only, no DeepSpeed, no pickle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from bigopt.load import safetensors_bytes
from bigopt.models import from_arch
from bigopt.runtime import RunDir
from bigopt.train.engine import DeepSpeedCheckpointing
from bigopt.train.layout import WEIGHTS_FILE


def _load(path: str) -> dict:
    # weights_only: tensors and plain containers only, even for our own files.
    return torch.load(path, map_location="cpu", weights_only=True)


def consolidated_state_dict(arch: Mapping[str, Any], checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The fp32 state dict of the model ``arch`` describes, from the local checkpoint
    directory ``checkpoint_dir`` (gathered across ZeRO-3 shards and pipeline stages)."""
    ds_dir = os.path.join(checkpoint_dir, DeepSpeedCheckpointing.TAG)
    if os.path.exists(os.path.join(checkpoint_dir, "ddp_state.pt")):
        state = _load(os.path.join(checkpoint_dir, "ddp_state.pt"))["model"]
    elif os.path.exists(os.path.join(ds_dir, "layer_00-model_states.pt")):
        # Pipeline checkpoints hold one file per layer of model.layers(): name them by the
        # module the layer is in the whole model.
        model = from_arch(arch)
        names = {id(m): n for n, m in model.named_modules()}
        state = {}
        for i, layer in enumerate(model.layers()):
            path = os.path.join(ds_dir, f"layer_{i:02d}-model_states.pt")
            if os.path.exists(path):  # parameter-free layers are not saved
                prefix = names[id(layer)]
                state.update({f"{prefix}.{k}" if prefix else k: v for k, v in _load(path).items()})
    elif any(f.startswith(("zero_pp_rank", "bf16_zero_pp_rank")) for f in os.listdir(ds_dir)):
        # ZeRO 1-3 (and bf16): the fp32 master weights live in the optimizer shards.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DeepSpeedCheckpointing.TAG)
    else:
        state = _load(os.path.join(ds_dir, "mp_rank_00_model_states.pt"))["module"]
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
            for k, v in state.items()}


def load_trained_model(arch: Mapping[str, Any], checkpoint_dir: str) -> nn.Module:
    """The model ``arch`` describes with the weights of ``checkpoint_dir`` (local), in fp32."""
    model = from_arch(arch).float()
    model.load_state_dict(consolidated_state_dict(arch, checkpoint_dir))
    return model


def write_weights(out: RunDir, state: Mapping[str, torch.Tensor], *, rel: str = WEIGHTS_FILE,
                  metadata: dict[str, str] | None = None) -> str:
    """Write ``state`` as ``<out>/<rel>`` (local or S3); returns its URI."""
    out.write_bytes(rel, safetensors_bytes(state, metadata))
    return out.uri_of(rel)


def consolidate_checkpoint(out: RunDir, arch: Mapping[str, Any], checkpoint_uri: str,
                           finalize: Any = None) -> str:
    """Read the checkpoint at ``checkpoint_uri`` (local or S3) and write its consolidated
    weights as ``<out>/model.safetensors`` (after ``finalize(state)``, e.g. the hooks' final
    pruning masks); returns that file's URI."""
    from ray.train import Checkpoint

    from bigopt.runtime import filesystem_for

    fs, path = filesystem_for(checkpoint_uri)
    with Checkpoint(path, filesystem=fs).as_directory() as local:
        state = consolidated_state_dict(arch, local)
    if finalize is not None:
        state = finalize(state)
    return write_weights(out, state)

