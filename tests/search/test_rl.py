"""RLSearcher driven directly (suggest / on_trial_complete), and once through a real Tuner."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from ray import tune

from bigopt.search import RandomSearcher, RLSearcher
from bigopt.search.rl import choices_for

from factories import drive_searcher

SPACE = {"model": {"depth": tune.choice([1, 2, 3, 4, 5, 6, 7, 8]),
                   "width": tune.choice([16, 32, 64, 128, 256])},
         "train": {"lr": tune.loguniform(1e-4, 1e-1), "batch_size": tune.randint(8, 65),
                   "warmup": tune.quniform(0, 100, 10), "steps": tune.randint(1, 4)},
         "name": "fixed"}


def objective(config) -> float:
    """A toy 'accuracy' with one best cell (depth 6, width 128, lr 1e-2)."""
    model, train = config["model"], config["train"]  # nested, as the space (Tune's shape)
    return (-abs(model["depth"] - 6) - abs(math.log2(model["width"] / 128))
            - abs(math.log10(train["lr"]) + 2))


def drive(searcher, trials: int, *, start: int = 0) -> list[dict]:
    return drive_searcher(searcher, objective, trials, start=start)


def test_choices_cover_each_range_within_bounds_and_quantization():
    rl = RLSearcher(SPACE, metric="acc", mode="max")
    by_path = {d.path: choices_for(d) for d in rl.space.dims}
    assert by_path["model.width"] == [16, 32, 64, 128, 256]
    assert by_path["train.steps"] == [1, 2, 3]  # randint's upper bound is exclusive
    assert by_path["train.batch_size"][0] == 8 and by_path["train.batch_size"][-1] == 64
    assert all(v % 10 == 0 for v in by_path["train.warmup"]) and len(by_path["train.warmup"]) <= 8
    lrs = by_path["train.lr"]
    assert len(lrs) == 8 and all(1e-4 <= v <= 1e-1 for v in lrs)
    assert math.isclose(math.log(lrs[1]) - math.log(lrs[0]), math.log(lrs[2]) - math.log(lrs[1]))
    for config in drive(rl, 20):
        flat = rl.space.flat(config)  # suggested in the space's nested shape
        assert config["name"] == "fixed" and flat["model.depth"] == config["model"]["depth"]
        assert all(flat[path] in values for path, values in by_path.items())


@pytest.mark.parametrize("policy", ["lstm", "transformer"])
def test_same_seed_same_suggestions_budget_and_global_torch_state_untouched(policy):
    torch.manual_seed(123)
    expected = torch.rand(3)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    a = drive(RLSearcher(SPACE, metric="acc", mode="max", seed=3, policy=policy), 30)
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads
    b = drive(RLSearcher(SPACE, metric="acc", mode="max", seed=3, policy=policy), 30)
    c = drive(RLSearcher(SPACE, metric="acc", mode="max", seed=4, policy=policy), 30)
    assert a == b and a != c
    searcher = RLSearcher(SPACE, metric="acc", mode="max", seed=3, max_trials=2, policy=policy)
    drive(searcher, 2)
    assert searcher.suggest("t2") == "FINISHED"


@pytest.mark.parametrize("policy", ["lstm", "transformer"])
def test_save_restore_resumes_with_the_same_next_suggestions(policy, tmp_path):
    kwargs = {"policy": policy, "hidden": 16}
    whole = drive(RLSearcher(SPACE, metric="acc", mode="max", seed=1, **kwargs), 30)
    first = RLSearcher(SPACE, metric="acc", mode="max", seed=1, **kwargs)
    drive(first, 17)
    live = first.suggest("t17")  # in flight at save time: its result arrives after the restore
    first.save(str(tmp_path / "s.json"))
    state = json.loads((tmp_path / "s.json").read_text())
    assert {"policy", "optimizer", "baseline", "spread", "actions"} <= set(state)
    again = RLSearcher(SPACE, metric="acc", mode="max", seed=99, **kwargs)  # seed comes from the file
    again.restore(str(tmp_path / "s.json"))
    again.on_trial_complete("t17", {"acc": objective(live)})
    assert [live, *drive(again, 30, start=18)] == whole[17:]


def test_failed_trials_change_nothing_and_do_not_crash():
    rl = RLSearcher(SPACE, metric="acc", mode="max", seed=0)
    drive(rl, 5)
    before = json.dumps(rl.get_state()["policy"]), rl.baseline, rl.updates
    for i, (result, error) in enumerate([(None, True), ({}, False), ({"acc": None}, False),
                                         ({"acc": 1.0}, True)]):
        config = rl.suggest(f"x{i}")
        rl.on_trial_complete(f"x{i}", result, error=error)
        assert rl.history[-1] == (rl.space.flat(config), None)
    assert (json.dumps(rl.get_state()["policy"]), rl.baseline, rl.updates) == before
    assert not rl.actions and not rl.live
    rl.on_trial_complete("never-suggested", {"acc": 1.0})  # ignored, as the other searchers do
    drive(rl, 10, start=5)
    assert rl.updates == 9


@pytest.mark.parametrize("policy", ["lstm", "transformer"])
def test_rl_beats_random_search_on_the_toy_objective(policy):
    # the best of 60 trials, averaged over 10 seeds; mode="min" on the negated objective
    # exercises the orientation of the reward as well
    best = {"rl": [], "random": []}
    for seed in range(10):
        for name, searcher in (("rl", RLSearcher(SPACE, "loss", "min", seed=seed, policy=policy)),
                               ("random", RandomSearcher(SPACE, "loss", "min", seed=seed))):
            configs = []
            for i in range(60):
                config = searcher.suggest(f"t{i}")
                configs.append(config)
                searcher.on_trial_complete(f"t{i}", {"loss": -objective(config)})
            best[name].append(max(objective(c) for c in configs))
    assert sum(best["rl"]) > sum(best["random"]), best


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="policy"):
        RLSearcher(SPACE, metric="acc", mode="max", policy="gru")
    with pytest.raises(ValueError, match="baseline_decay"):
        RLSearcher(SPACE, metric="acc", mode="max", baseline_decay=1.0)
    with pytest.raises(ValueError, match="update"):
        RLSearcher(SPACE, metric="acc", mode="max", update="ppo")
    with pytest.raises(ValueError, match="risk_quantile"):
        RLSearcher(SPACE, metric="acc", mode="max", update="risk_seeking", risk_quantile=0.0)
    with pytest.raises(ValueError, match="top_k"):
        RLSearcher(SPACE, metric="acc", mode="max", update="pqt", top_k=0)
    with pytest.raises(ValueError, match="fresh"):
        RLSearcher(SPACE, metric="acc", mode="max", candidates=4, fresh=4)


def test_risk_seeking_reinforces_only_trials_above_the_quantile_of_rewards_so_far():
    rl = RLSearcher(SPACE, metric="acc", mode="max", seed=0, update="risk_seeking",
                    risk_quantile=0.25)
    rewards: list[float] = []
    for i, reward in enumerate([1.0, 5.0, 2.0, 0.5, 6.0, 6.0, 3.0, 7.0]):
        rl.suggest(f"t{i}")
        policy_before, updates_before = json.dumps(rl.get_state()["policy"]), rl.updates
        rl.on_trial_complete(f"t{i}", {"acc": reward})
        rewards.append(reward)
        expected = len(rewards) > 1 and reward > float(np.quantile(rewards, 0.75))
        changed = json.dumps(rl.get_state()["policy"]) != policy_before
        assert changed == expected, (i, reward)
        assert rl.updates == updates_before + expected


def test_pqt_raises_the_likelihood_of_the_best_trials_so_far():
    rl = RLSearcher(SPACE, metric="acc", mode="max", seed=0, update="pqt", top_k=2)
    configs = drive(rl, 12)
    assert rl.updates == 12  # one maximum-likelihood step per completed trial
    best = [rl._actions_of(rl.space.flat(c)) for c in sorted(configs, key=objective, reverse=True)[:2]]
    with torch.no_grad():
        before = rl.policy.batch_log_prob_entropy(best)[0]
    worst = min(map(objective, configs))
    for i in range(5):  # five more results below the queue: it keeps training on the same two
        config = rl.suggest(f"x{i}")
        rl.on_trial_complete(f"x{i}", {"acc": worst - 1.0})
        assert config is not None
    with torch.no_grad():
        after = rl.policy.batch_log_prob_entropy(best)[0]
    assert torch.all(after > before), (before, after)


@pytest.mark.parametrize("policy", ["lstm", "transformer"])
def test_batched_log_prob_equals_one_sequence_at_a_time(policy):
    rl = RLSearcher(SPACE, metric="acc", mode="max", seed=0, policy=policy)
    drive(rl, 6)
    batch = [[0, 1, 2, 3, 4, 5], [7, 4, 0, 0, 1, 2], [3, 3, 3, 3, 3, 3]]
    batch = [[min(a, len(c) - 1) for a, c in zip(seq, rl.choices, strict=True)] for seq in batch]
    log_prob, entropy = rl.policy.batch_log_prob_entropy(batch)
    for i, seq in enumerate(batch):
        lp, ent = rl.policy.log_prob_entropy(seq)
        assert torch.allclose(log_prob[i], lp, atol=1e-6) and torch.allclose(entropy[i], ent, atol=1e-6)


@pytest.mark.parametrize("options", [{"update": "risk_seeking"}, {"update": "pqt", "top_k": 4},
                                     {"candidates": 4, "fresh": 2}])
def test_update_rules_and_fresh_draws_resume_and_beat_random(options, tmp_path):
    whole = drive(RLSearcher(SPACE, metric="acc", mode="max", seed=1, **options), 24)
    first = RLSearcher(SPACE, metric="acc", mode="max", seed=1, **options)
    drive(first, 13)
    first.save(str(tmp_path / "s.json"))
    again = RLSearcher(SPACE, metric="acc", mode="max", seed=5, **options)
    again.restore(str(tmp_path / "s.json"))
    assert drive(again, 24, start=13) == whole[13:]
    best_rl, best_random = [], []
    for seed in range(6):
        best_rl.append(max(map(objective, drive(
            RLSearcher(SPACE, metric="acc", mode="max", seed=seed, **options), 50))))
        best_random.append(max(map(objective, drive(RandomSearcher(SPACE, "acc", "max", seed=seed), 50))))
    assert sum(best_rl) > sum(best_random), (best_rl, best_random)


@pytest.mark.slow
def test_rl_searcher_drives_a_real_tuner(ray_session, tmp_path):
    def trainable(config):
        if config["model"]["depth"] == 1:
            raise RuntimeError("a crashing trial: the searcher must carry on")
        tune.report({"acc": objective(config)})

    searcher = RLSearcher(SPACE, metric="acc", mode="max", seed=0, max_trials=12, policy="transformer")
    results = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="rl")).fit()
    assert len(results) == 12
    assert len(results.errors) == sum(r.config["model"]["depth"] == 1 for r in results)
    assert {r.config["name"] for r in results} == {"fixed"}
    assert len(searcher.history) == 12 and not searcher.live and not searcher.actions
    assert searcher.updates == sum(s is not None for _, s in searcher.history) - 1
