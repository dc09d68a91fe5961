"""``bigopt.load_model``: rebuild the ``nn.Module`` of any model artifact, local or ``s3://``.

Only the artifact's JSON, its architecture dict and its ``model.safetensors`` are read: no
DeepSpeed, no pickle, so a model from anywhere loads safely in a plain PyTorch process.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from bigopt.artifacts import ARTIFACT_FILE, Artifact, ModelArtifact, parse_artifact
from bigopt.runtime import RunDir


def find_model_artifact(where: str | RunDir) -> ModelArtifact:
    """The model artifact at ``where``: an ``artifact.json``, a stage folder holding one, or a
    run dir (its newest model: compress's when it ran, else train's)."""
    from bigopt.stages import STAGES

    run = where if isinstance(where, RunDir) else RunDir(str(where).removesuffix("/" + ARTIFACT_FILE))
    if run.exists(ARTIFACT_FILE):
        candidates = [run]
    else:
        candidates = [run.stage(s.name) for s in reversed(STAGES) if s.produces == "model"]
    for folder in candidates:
        if folder.exists(ARTIFACT_FILE):
            artifact = parse_artifact(folder.read_json(ARTIFACT_FILE))
            if not isinstance(artifact, ModelArtifact):
                raise ValueError(f"{folder.uri_of(ARTIFACT_FILE)} is a {artifact.kind!r} artifact, "
                                 "not a model")
            return artifact
    looked = ", ".join(f.uri_of(ARTIFACT_FILE) for f in candidates)
    raise FileNotFoundError(f"no model artifact at {run.uri}: looked for {looked}; run the train "
                            "stage there (or pass a stage folder / artifact.json)")


def safetensors_bytes(state: Any, metadata: dict[str, str] | None = None) -> bytes:
    """A state dict as safetensors bytes: the one writer of the format ``load_state`` reads.
    Tensors sharing a storage (tied weights) are cloned and all made contiguous, which
    safetensors requires; a torchao tensor subclass is refused with the reason."""
    import torch
    from safetensors.torch import save

    seen: set[int] = set()
    tensors = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
            raise TypeError(f"{name} is a {type(tensor).__name__}, which safetensors cannot store "
                            "(a quantized tensor: measure it with quantized_size_bytes)")
        ptr = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.cpu().clone() if ptr in seen else tensor.cpu().contiguous()
        seen.add(ptr)
    return save(tensors, metadata=metadata)


def load_state(weights_uri: str) -> dict[str, Any]:
    """The tensors of a safetensors file (local or S3)."""
    from safetensors.torch import load

    folder, _, name = weights_uri.rpartition("/")
    where = RunDir(folder)
    if not where.exists(name):
        raise FileNotFoundError(f"model weights {weights_uri} are missing")
    with where.fs.open_input_stream(where.sub(name)) as src:
        return load(src.read())


def load_weights_into(model: nn.Module, state: dict[str, Any], *, source: str) -> nn.Module:
    """``model.load_state_dict(state)``, with an error naming the first tensor that does not fit."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state:
            raise ValueError(f"{source}: no tensor {name!r}, which the architecture has "
                             f"(shape {tuple(tensor.shape)})")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                             f"the architecture expects {tuple(tensor.shape)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise ValueError(f"{source}: tensor {extra[0]!r} is not in the architecture")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model


def apply_load_transforms(model: nn.Module, transforms: list[dict[str, Any]]) -> nn.Module:
    """Conversions a model artifact records to run after its weights load (int8 quantization)."""
    for t in transforms:
        if t.get("kind") == "quantize" and t.get("mode") == "qat":
            # weights trained under fake quantization: the same fake quant, then converted
            from bigopt.compress.quantize import QATPrepare, qat_convert

            model = qat_convert(QATPrepare()(model))
        elif t.get("kind") == "quantize":
            from bigopt.compress.quantize import ptq

            model = ptq(model, t["mode"])
        else:
            raise ValueError(f"unknown load transform {t.get('kind')!r}")
    return model


def load_model(where: str | RunDir | Artifact, *, transforms: bool = True) -> nn.Module:
    """The model of a model artifact (or of a run dir's newest one), in eval mode on the CPU.

    ``transforms=False`` returns the fp32 model before recorded conversions (int8) are applied.
    """
    from bigopt.models import from_arch

    artifact = where if isinstance(where, ModelArtifact) else find_model_artifact(
        where if isinstance(where, (str, RunDir)) else where.uri)
    if not artifact.weights:
        raise FileNotFoundError(f"the model artifact of {artifact.run} ({artifact.stage}) has no "
                                "consolidated weights (model.safetensors); it predates them: "
                                "train again, or resume it for one step")
    model = from_arch(artifact.arch).float()
    load_weights_into(model, load_state(artifact.weights), source=artifact.weights)
    model.eval()
    if transforms and artifact.transforms:
        model = apply_load_transforms(model, artifact.transforms)
    return model
