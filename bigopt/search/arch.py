"""Architecture spaces over the model zoo, as flat Tune decisions, and their translation to models.

A searcher sees a flat list of categorical decisions (``arch.family``, ``arch.depth``,
``arch.s0.block``, ``arch.s0.width``, ...): every searcher (evolution, RL, random, TPE) can work
on that. Conditional choices are decisions that only apply under others (a kernel size for a
``resnet``/``plain`` stage, heads for a ``transformer`` stage, stages past ``depth``, cnn
decisions when the family is mlp): they are still drawn, ignored when the model is built, and
reported as null (``active``), so two points that build the same model read the same.

``check_point`` builds the model the point describes, on the CPU, before any trial starts: a
point the zoo refuses (heads that do not divide the width) or over ``max_params`` is rejected
with the reason, and a valid one is measured (parameters, forward FLOPs, CPU latency) for the
Pareto fronts.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

from ray import tune

from bigopt.spec import ArchSpaceSpec, JobSpec, with_values

PREFIX = "arch."


def _choice(values: list[Any]) -> Any:
    return tune.choice(list(values))


def arch_space(arch: ArchSpaceSpec) -> dict[str, Any]:
    """The decisions of ``arch`` as ``{"arch.…": tune.choice(...)}``."""
    space: dict[str, Any] = {"arch.family": _choice(arch.families), "arch.depth": _choice(arch.depth)}
    stages = max(arch.depth)
    if "cnn" in arch.families:
        space["arch.stem"] = _choice(arch.stem)
        for i in range(stages):
            space[f"arch.s{i}.block"] = _choice(arch.blocks)
            space[f"arch.s{i}.width"] = _choice(arch.widths)
            if {"resnet", "plain"} & set(arch.blocks):
                space[f"arch.s{i}.kernel"] = _choice(arch.kernels)
            if "transformer" in arch.blocks:
                space[f"arch.s{i}.heads"] = _choice(arch.heads)
    if "mlp" in arch.families:
        for i in range(stages):
            space[f"arch.mlp{i}.width"] = _choice(arch.mlp_widths)
    if "gpt" in arch.families:
        space["arch.width"] = _choice(arch.widths)
        space["arch.heads"] = _choice(arch.heads)
    return space


def _shapes_model(key: str, point: dict[str, Any]) -> bool:
    family, depth = point["arch.family"], int(point["arch.depth"])
    head, _, leaf = key[len(PREFIX):].partition(".")  # "s0.block" -> ("s0", "block")
    if head in ("family", "depth"):
        return True
    if family == "cnn":
        if head == "stem":
            return True
        if head[0] == "s" and head[1:].isdigit() and int(head[1:]) < depth:
            block = point[f"arch.{head}.block"]
            return (leaf in ("block", "width") or (leaf == "kernel" and block in ("resnet", "plain"))
                    or (leaf == "heads" and block == "transformer"))
        return False
    if family == "mlp":
        return head.startswith("mlp") and int(head[3:]) < depth
    return head in ("width", "heads")  # gpt


def active(point: dict[str, Any]) -> dict[str, Any]:
    """``point`` with the decisions that do not shape the model set to None."""
    if "arch.family" not in point:
        return dict(point)
    return {k: v if not k.startswith(PREFIX) or _shapes_model(k, point) else None
            for k, v in point.items()}


def model_section(point: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The spec's ``model`` section for ``point``; ``base`` (the spec's own model section) gives
    what the space does not decide (input size, classes, context, vocabulary)."""
    family, depth = point["arch.family"], int(point["arch.depth"])
    keep = {k: base[k] for k in ("in_channels", "num_classes", "image_size", "vocab_size",
                                 "context", "dropout", "preset") if base.get(k) is not None}
    if family == "mlp":
        in_features = (base.get("in_features") or
                       base.get("in_channels", 1) * base.get("image_size", 8) ** 2)
        return {"kind": "mlp", "in_features": in_features, "num_classes": keep.get("num_classes", 10),
                "hidden": [int(point[f"arch.mlp{i}.width"]) for i in range(depth)]}
    if family == "gpt":
        return {**{k: v for k, v in keep.items() if k in ("vocab_size", "context", "dropout",
                                                         "preset")},
                "kind": "gpt", "n_layer": depth, "d_model": int(point["arch.width"]),
                "n_head": int(point["arch.heads"])}
    blocks: list[dict[str, Any]] = []
    channels = int(point["arch.stem"])
    for i in range(depth):
        block, width = point[f"arch.s{i}.block"], int(point[f"arch.s{i}.width"])
        # every stage halves the resolution: 28 -> 14 -> 7 -> 4 keeps trials cheap on CPUs
        if block in ("resnet", "plain"):
            blocks.append({"type": block, "channels": width, "stride": 2,
                           "kernel": int(point[f"arch.s{i}.kernel"])})
            channels = width
        elif block == "dense":
            # a transition to `width` halves the map, then 3 layers grow it by width/2 each
            growth = max(4, width // 2)
            blocks += [{"type": "transition", "channels": width},
                       {"type": "dense", "growth": growth, "layers": 3}]
            channels = width + 3 * growth
        else:
            blocks += [{"type": "transition", "channels": width},
                       {"type": "transformer", "channels": width,
                        "heads": int(point[f"arch.s{i}.heads"])}]
            channels = width
    del channels  # the head reads whatever the last block gives
    return {"kind": "cnn", "in_channels": keep.get("in_channels", 1),
            "num_classes": keep.get("num_classes", 10), "image_size": keep.get("image_size", 28),
            "stem_channels": int(point["arch.stem"]), "blocks": blocks}


def spec_values(point: dict[str, Any], spec: JobSpec) -> dict[str, Any]:
    """A trial's config as spec paths: hyperparameters as they are, the ``arch.*`` decisions
    replaced by a whole ``model`` section."""
    values = {k: _like_spec(v, k, spec) for k, v in point.items() if not k.startswith(PREFIX)}
    if any(k.startswith(PREFIX) for k in point):
        assert spec.model is not None
        values["model"] = model_section(point, spec.model.model_dump(mode="json"))
    return values


def _like_spec(value: Any, path: str, spec: JobSpec) -> Any:
    """An integer field gets an integer: PB2 explores a continuous range even for
    ``train.batch_size``, and 37.4 rows per batch means 37."""
    node: Any = spec.model_dump(mode="json")
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, int) and not isinstance(node, bool) and isinstance(value, float):
        return int(round(value))
    return value


class InvalidPoint(ValueError):
    """A point the zoo refuses or a constraint excludes; rejected before a trial starts."""


@dataclass(frozen=True)
class PointCosts:
    params: int
    flops: float  # forward FLOPs per sample
    latency_ms: float  # fastest CPU forward, batch of one


def measure_latency_ms(model: Any, x: Any, repeats: int = 20) -> float:
    """The fastest of ``repeats`` forward passes (batch of one, no grad): the minimum is what
    the model costs; slower runs measure whatever else the machine was doing."""
    import torch

    model.eval()
    times = []
    with torch.no_grad():
        model(x)  # warm-up: first-call allocations
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1000 * min(times)


def check_point(point: dict[str, Any], spec: JobSpec, *, max_params: int | None = None,
                latency: bool = True) -> tuple[JobSpec, PointCosts]:
    """The trial's spec and its costs, or ``InvalidPoint`` naming why it cannot run."""
    import torch

    from bigopt.models import from_arch
    from bigopt.spec import SpecError

    try:
        trial_spec = with_values(spec.model_copy(update={"search": None}), spec_values(point, spec))
    except SpecError as exc:
        raise InvalidPoint(str(exc).replace("\n", "; ")) from None
    arch = copy.deepcopy(trial_spec.model.model_dump(mode="json"))  # type: ignore[union-attr]
    if arch["kind"] == "gpt":
        arch = {"kind": "gpt", **trial_spec.model.config()}  # type: ignore[union-attr]
    try:
        with torch.random.fork_rng():  # building draws init weights: leave the caller's RNG
            model = from_arch(arch)
    except ValueError as exc:
        raise InvalidPoint(f"model: {exc}") from None
    params = int(model.num_params())
    if max_params is not None and params > max_params:
        raise InvalidPoint(f"{params:,} parameters > search.arch.max_params {max_params:,}")
    with torch.random.fork_rng():
        x, _ = model.example_input(1)
        flops = float(model.flops_per_sample()) / 3  # forward only
        latency_ms = measure_latency_ms(model, x) if latency else float("nan")
    return trial_spec, PointCosts(params, flops, latency_ms)
