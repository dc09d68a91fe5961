"""bigopt model zoo: GPT, CNN and MLP, each a flat list of pipeline-splittable layers.

Every model exposes ``layers()``, a staticmethod ``loss``, ``flops_per_sample()``,
``num_params()``, ``example_input(batch_size)`` and ``arch()``; see ``base.LayeredModel``.
This package imports only torch and the standard library (dependency direction: the training
and search stages import models, never the reverse).
"""

from collections.abc import Mapping
from typing import Any

from bigopt.models.base import LayeredModel, check_config_keys
from bigopt.models.cnn import CNN
from bigopt.models.gpt import GPT, GPT_PRESETS
from bigopt.models.mlp import MLP

__all__ = ["CNN", "GPT", "GPT_PRESETS", "MLP", "LayeredModel", "build_model", "from_arch"]

MODEL_KINDS: dict[str, type[LayeredModel]] = {"gpt": GPT, "cnn": CNN, "mlp": MLP}


def build_model(kind: str, **config: Any) -> LayeredModel:
    """Build a model by kind name, e.g. ``build_model("mlp", in_features=784)``.

    Unknown kinds and unknown config keys raise ValueError naming them and the allowed ones,
    so a typo in a spec fails at validation time instead of as a TypeError inside a worker.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(
            f"unknown model kind {kind!r}; expected one of: {', '.join(sorted(MODEL_KINDS))}"
        )
    cls = MODEL_KINDS[kind]
    check_config_keys(cls, config, what=f"model kind {kind!r}")
    return cls(**config)


def from_arch(arch: Mapping[str, Any]) -> LayeredModel:
    """Build a model from ``{"kind": ..., **config}``, the form ``model.arch()`` returns.

    This is how an architecture-search stage stores and rebuilds a trial's model: the dict is
    plain JSON, so ``from_arch(json.loads(json.dumps(model.arch())))`` gives the same model.
    """
    if not isinstance(arch, Mapping):
        raise ValueError(f"arch must be a dict with a 'kind' key, got {type(arch).__name__}")
    if "kind" not in arch:
        raise ValueError(
            f"arch is missing 'kind'; expected one of: {', '.join(sorted(MODEL_KINDS))}"
        )
    config = dict(arch)
    return build_model(config.pop("kind"), **config)
