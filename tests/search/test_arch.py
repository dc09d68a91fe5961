"""Architecture spaces: decisions -> zoo models, conditional choices, invalid points, fronts."""

from __future__ import annotations

import numpy as np
import pytest

from bigopt.search.arch import InvalidPoint, active, arch_space, check_point, model_section
from bigopt.search.pareto import pareto_front
from bigopt.search.space import Space
from bigopt.spec import ArchSpaceSpec

from factories import make_spec

IMAGES = {"data": {"source": {"kind": "digits", "path": None, "max_files": None}},
          "model": {"kind": "cnn", "image_size": 8, "n_layer": None, "n_head": None,
                    "d_model": None, "context": None},
          "cluster": {"num_workers": 1}}


def test_every_sampled_point_builds_a_zoo_model_or_is_rejected_with_a_reason():
    spec = make_spec(**IMAGES)
    space = Space(arch_space(ArchSpaceSpec(heads=[1, 2, 3])))
    rng = np.random.default_rng(0)
    kinds, reasons = set(), []
    for _ in range(60):
        point = space.sample(rng)
        try:
            trial_spec, costs = check_point(point, spec, latency=False)
        except InvalidPoint as exc:
            reasons.append(str(exc))
            continue
        kinds.add(trial_spec.model.kind)
        assert trial_spec.model.kind == point["arch.family"]
        assert costs.params > 0 and costs.flops > 0
        if point["arch.family"] == "mlp":
            assert len(trial_spec.model.hidden) == point["arch.depth"]
    assert kinds == {"cnn", "mlp"}
    # heads=3 never divides widths 16/32/64; an 8x8 image cannot be halved 4 times
    assert reasons and all("heads=3" in r or "pool" in r for r in reasons), reasons[:3]


def test_conditional_decisions_are_null_when_they_do_not_shape_the_model():
    point = {"arch.family": "cnn", "arch.depth": 1, "arch.stem": 16, "arch.s0.block": "dense",
             "arch.s0.width": 32, "arch.s0.kernel": 5, "arch.s0.heads": 2, "arch.s1.block": "resnet",
             "arch.s1.width": 16, "arch.s1.kernel": 3, "arch.s1.heads": 1, "arch.mlp0.width": 64,
             "train.lr": 0.01}
    shown = active(point)
    assert shown["arch.s0.block"] == "dense" and shown["arch.s0.width"] == 32
    assert shown["arch.s0.kernel"] is None and shown["arch.s0.heads"] is None  # dense: neither
    assert shown["arch.s1.block"] is None and shown["arch.mlp0.width"] is None  # past depth / mlp
    assert shown["train.lr"] == 0.01
    model = model_section(point, {"kind": "cnn", "image_size": 28, "in_channels": 1, "num_classes": 10})
    assert [b["type"] for b in model["blocks"]] == ["transition", "dense"]
    # the same model from two points that differ only in inactive decisions
    other = {**point, "arch.s0.kernel": 3, "arch.s1.block": "plain", "arch.mlp0.width": 512}
    assert model_section(other, {"kind": "cnn"}) == model_section(point, {"kind": "cnn"})


def test_skip_pattern_and_kernel_reach_the_model():
    spec = make_spec(**IMAGES)
    base = {"arch.family": "cnn", "arch.depth": 1, "arch.stem": 8, "arch.s0.width": 16,
            "arch.s0.kernel": 5, "arch.s0.heads": 1}
    with_skip, _ = check_point({**base, "arch.s0.block": "resnet"}, spec, latency=False)
    without, costs = check_point({**base, "arch.s0.block": "plain"}, spec, latency=False)
    assert with_skip.model.blocks[0] == {"type": "resnet", "channels": 16, "stride": 2, "kernel": 5}
    assert without.model.blocks[0]["type"] == "plain"
    from bigopt.models import from_arch

    skip_params = from_arch(with_skip.model.model_dump()).num_params()
    assert skip_params > costs.params  # the skip's 1x1 projection is the difference


def test_max_params_rejects_before_a_trial():
    spec = make_spec(**IMAGES)
    point = {"arch.family": "mlp", "arch.depth": 2, "arch.mlp0.width": 512, "arch.mlp1.width": 512}
    with pytest.raises(InvalidPoint, match="max_params"):
        check_point(point, spec, max_params=10_000, latency=False)


def test_pareto_front_keeps_exactly_the_non_dominated_trials():
    rows = [{"id": i, "params": p, "metric": m} for i, (p, m) in enumerate(
        [(10, 0.80), (20, 0.85), (20, 0.83), (30, 0.84), (40, 0.90), (5, 0.70), (50, 0.90)])]
    front = pareto_front(rows, "params", "max")
    assert [r["id"] for r in front] == [5, 0, 1, 4]
    for r in rows:  # every trial left out is dominated by one on the front
        if r not in front:
            assert any(f["params"] <= r["params"] and f["metric"] >= r["metric"] for f in front)
    loss_front = pareto_front([{**r, "metric": 1 - r["metric"]} for r in rows], "params", "min")
    assert [r["id"] for r in loss_front] == [5, 0, 1, 4]
