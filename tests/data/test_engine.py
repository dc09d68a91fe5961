"""The adaptive engine: one size rule, and the same decisions on either path."""

from __future__ import annotations

import numpy as np
import pytest

from bigopt.data.engine import SINGLE_TASK_MAX_BYTES, choose_engine
from bigopt.data.steps import StepContext, run_steps
from bigopt.runtime import RunDir
from bigopt.spec import ExactDedupStep, IncompleteStep, NearDedupStep, NoiseStep

from factories import dirty_text_rows, rejected_rows

TEXT = StepContext(key="path", content="text", label=None, modality="text", seed=0)
IMAGE = StepContext(key="id", content="inputs", label="labels", modality="image", seed=0)


def test_one_rule_by_size_and_the_spec_can_force_either():
    assert choose_engine(0) == choose_engine(SINGLE_TASK_MAX_BYTES) == "single"
    assert choose_engine(SINGLE_TASK_MAX_BYTES + 1) == "distributed"
    assert choose_engine(10, "distributed") == "distributed"
    assert choose_engine(10**12, "single") == "single"
    with pytest.raises(ValueError, match="data.engine"):
        choose_engine(10, "fast")


def _run_both(ray, tmp_path, rows, steps, ctx, **kw):
    """(kept rows by key, rejected (key, step, reason), records) of each engine."""
    out = {}
    for engine in ("single", "distributed"):
        run = RunDir(str(tmp_path / engine)).stage("data")
        kept, records = run_steps(ray.data.from_items(rows, override_num_blocks=4), steps, ctx,
                                  run, engine=engine, **kw)
        kept_rows = {r[ctx.key]: r for r in kept.iter_rows()}
        rejected = sorted((r[ctx.key], r["step"], r["reason"])
                          for r in rejected_rows(RunDir(str(tmp_path / engine))))
        out[engine] = (kept_rows, rejected, records)
        assert {r["engine"] for r in records} == {engine}
    return out["single"], out["distributed"]


def _counts(records):
    return [(r["step"], r["rows_in"], r["kept"], r["rejected"], r["rejected_by_reason"])
            for r in records]


@pytest.mark.slow
def test_text_steps_decide_the_same_on_both_engines(ray_session, tmp_path):
    steps = [IncompleteStep(kind="incomplete"), NoiseStep(kind="noise", min_chars=5),
             ExactDedupStep(kind="exact_dedup"), NearDedupStep(kind="near_dedup")]
    single, dist = _run_both(ray_session, tmp_path, dirty_text_rows(), steps, TEXT, read=True)
    assert set(single[0]) == set(dist[0])
    assert single[1] == dist[1]
    assert _counts(single[2]) == _counts(dist[2])
    reasons = {step: n for step, _, _, _, by in _counts(single[2]) for n in [by]}
    # every kind of dirt was there and was caught (so the comparison compares something)
    assert reasons["read"] == {"unreadable": 1}
    assert reasons["incomplete"] == {"incomplete": 2} and reasons["noise"] == {"noise": 1}
    assert reasons["exact_dedup"] == {"exact_duplicate": 3}
    assert reasons["near_dedup"]["near_duplicate"] >= 5
    for step in ("exact_dedup", "near_dedup"):  # groups, clusters, pairs and examples too
        details = [{k: v for k, v in [r for r in records if r["step"] == step][0]["details"].items()
                    if k != "phase_seconds"}  # timings differ, decisions may not
                   for records in (single[2], dist[2])]
        assert details[0] == details[1], step


def test_the_shuffle_follows_the_source_size():
    from bigopt.data.prepare import SORT_SHUFFLE_MAX_SOURCE_BYTES, shuffle_strategy

    assert shuffle_strategy(0) == shuffle_strategy(SORT_SHUFFLE_MAX_SOURCE_BYTES) == "sort_shuffle_pull_based"
    assert shuffle_strategy(SORT_SHUFFLE_MAX_SOURCE_BYTES + 1) == "hash_shuffle"


@pytest.mark.slow
def test_text_steps_decide_the_same_under_the_hash_shuffle(ray_session, tmp_path):
    """Sources over 1 GiB shuffle by hash (``prepare.shuffle_strategy``): the distributed
    steps under it decide as the single engine does."""
    from ray.data.context import ShuffleStrategy

    steps = [IncompleteStep(kind="incomplete"), NoiseStep(kind="noise", min_chars=5),
             ExactDedupStep(kind="exact_dedup"), NearDedupStep(kind="near_dedup")]
    ctx = ray_session.data.DataContext.get_current()
    previous, ctx.shuffle_strategy = ctx.shuffle_strategy, ShuffleStrategy("hash_shuffle")
    try:
        single, dist = _run_both(ray_session, tmp_path, dirty_text_rows(), steps, TEXT, read=True)
    finally:
        ctx.shuffle_strategy = previous
    assert set(single[0]) == set(dist[0]) and single[1] == dist[1]
    assert _counts(single[2]) == _counts(dist[2])
    by_reason = {r["step"]: r["rejected_by_reason"] for r in dist[2]}
    assert by_reason["exact_dedup"] == {"exact_duplicate": 3}
    assert by_reason["near_dedup"]["near_duplicate"] >= 5  # so the comparison compares something


@pytest.mark.slow
def test_near_dedup_groups_the_same_on_both_engines(ray_session, tmp_path):
    steps = [NearDedupStep(kind="near_dedup", action="group")]
    rows = [r for r in dirty_text_rows(30) if not r["path"].startswith("bad/")]
    single, dist = _run_both(ray_session, tmp_path, rows, steps, TEXT, read=True)
    groups = {k: r["group"] for k, r in single[0].items()}
    assert groups == {k: r["group"] for k, r in dist[0].items()}
    assert len(set(groups.values())) < len(groups)  # some rows share a group


@pytest.mark.slow
def test_image_steps_decide_the_same_on_both_engines(ray_session, tmp_path):
    from bigopt.data.images import load_digits_rows

    rows = load_digits_rows(120)
    rows += [{**rows[i], "id": f"copy-{n}"} for n, i in enumerate((3, 5, 5))]  # 5: a group of 3
    rows.append({**rows[0], "id": "nan", "inputs": np.full((1, 8, 8), np.nan, np.float32)})
    steps = [IncompleteStep(kind="incomplete"), ExactDedupStep(kind="exact_dedup")]
    single, dist = _run_both(ray_session, tmp_path, rows, steps, IMAGE)
    assert set(single[0]) == set(dist[0])
    assert single[1] == dist[1] and len(single[1]) >= 4
    assert _counts(single[2]) == _counts(dist[2])
    kept = single[0]["digits-00000"]
    assert np.asarray(kept["inputs"]).shape == (1, 8, 8)  # tensor columns survive the engine
