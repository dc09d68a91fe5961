"""The search stage's searcher wrapper (``bigopt.search.stage.ValidatingSearcher``): it keeps the
trial budget and concurrency, and on resume reconciles a saved state that is one save behind
(or ahead of) Tune's trial table, the state a driver killed mid-save leaves."""

from __future__ import annotations

from typing import Any

import pytest
from ray import tune
from ray.tune.search import Searcher

from bigopt.search import RandomSearcher, RLSearcher
from bigopt.search.stage import ValidatingSearcher

SPACE = {"lr": tune.loguniform(1e-4, 1e-1), "width": tune.choice([8, 16, 32])}


def wrapped(cls: type = RandomSearcher, max_trials: int = 6, max_concurrent: int = 1) -> Any:
    return ValidatingSearcher(cls(space=SPACE, metric="acc", mode="max", seed=3), lambda c: None,
                              max_trials=max_trials, max_concurrent=max_concurrent)


def result(config: dict[str, Any]) -> dict[str, Any]:
    return {"acc": config["lr"] * config["width"]}


def run_to_end(s: Any, start: int = 0) -> list[dict[str, Any]]:
    """Drive ``s`` one trial at a time (``max_concurrent=1``), as Tune does; the configs."""
    configs = []
    for i in range(start, 100):
        config = s.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            return configs
        configs.append(config)
        s.on_trial_complete(f"t{i}", result(config))
    raise AssertionError("the budget never ran out")


def test_budget_and_concurrency_are_the_wrappers():
    s = wrapped(max_trials=3, max_concurrent=2)
    a, b = s.suggest("a"), s.suggest("b")
    assert isinstance(a, dict) and isinstance(b, dict)
    assert s.suggest("c") is None  # two running
    s.on_trial_complete("a", result(a))
    assert isinstance(s.suggest("c"), dict)
    s.on_trial_complete("b", result(b))
    assert s.suggest("d") == Searcher.FINISHED  # three begun


def trial(trial_id: str, status: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"trial_id": trial_id, "status": status, "config": config,
            "result": result(config) if status == "TERMINATED" else None}


@pytest.mark.parametrize("cls", [RandomSearcher, RLSearcher])
def test_a_state_one_save_behind_resumes_as_if_never_interrupted(cls, tmp_path):
    reference = run_to_end(wrapped(cls))
    s = wrapped(cls)
    c0 = s.suggest("t0")
    s.on_trial_complete("t0", result(c0))
    s.save_to_dir(str(tmp_path))  # the last save the driver finished
    c1 = s.suggest("t1")
    s.on_trial_complete("t1", result(c1))
    c2 = s.suggest("t2")  # killed here: the trial table knows t0, t1 done and t2 running
    resumed = wrapped(cls)
    resumed.truth = [trial("t0", "TERMINATED", c0), trial("t1", "TERMINATED", c1),
                     trial("t2", "RUNNING", c2)]
    resumed.restore_from_dir(str(tmp_path))
    assert resumed.suggest("t3") is None  # t2 (requeued by Tune) is still running
    resumed.on_trial_complete("t2", result(c2))
    rest = run_to_end(resumed, start=3)
    assert [c0, c1, c2, *rest] == reference  # nothing repeated, nothing skipped, same budget


def test_a_state_ahead_of_the_trial_table_drops_the_unrecorded_trial(tmp_path):
    s = wrapped()
    c0 = s.suggest("t0")
    s.on_trial_complete("t0", result(c0))
    s.suggest("t1")  # suggested and saved, but the trial table never recorded t1
    s.save_to_dir(str(tmp_path))
    resumed = wrapped()
    resumed.truth = [trial("t0", "TERMINATED", c0)]
    resumed.restore_from_dir(str(tmp_path))
    c2 = resumed.suggest("t2")
    assert isinstance(c2, dict)  # not blocked by a trial that never runs
    resumed.on_trial_complete("t2", result(c2))
    assert len(run_to_end(resumed, start=3)) == 4  # 6 in all: t0, t2 and four more


def test_a_trial_finished_after_the_save_reaches_the_inner_searcher(tmp_path):
    s = wrapped()
    c0 = s.suggest("t0")
    s.save_to_dir(str(tmp_path))  # t0 running when saved; it finished before the kill
    resumed = wrapped()
    resumed.truth = [trial("t0", "TERMINATED", c0)]
    resumed.restore_from_dir(str(tmp_path))
    assert resumed.inner.history == [(c0, result(c0)["acc"])]
    assert isinstance(resumed.suggest("t1"), dict)


def test_rl_adopts_the_actions_of_the_config_a_trial_really_got():
    inner = RLSearcher(space=SPACE, metric="acc", mode="max", seed=0)
    inner.suggest("t0")
    other = {"lr": inner.choices[0][2], "width": 32}
    inner.adopt("t0", other)
    assert inner.live["t0"] == other and inner.actions["t0"] == [2, 2]
    inner.adopt("t0", {"lr": 0.123456, "width": 32})  # off the policy's grid: learn nothing
    assert "t0" not in inner.actions
