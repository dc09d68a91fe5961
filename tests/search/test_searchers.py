"""Searchers as Tune Searchers, driven directly (suggest / on_trial_complete), no Tune run."""

from __future__ import annotations

import json

import pytest
from ray import tune

from bigopt.search import EvolutionSearcher, RandomSearcher, RLSearcher
from bigopt.search.space import Space

from factories import drive_searcher

SPACE = {"model": {"depth": tune.choice([1, 2, 3, 4, 5, 6, 7, 8]),
                   "width": tune.choice([16, 32, 64, 128, 256])},
         "train": {"lr": tune.loguniform(1e-4, 1e-1), "batch_size": tune.randint(8, 65),
                   "warmup": tune.quniform(0, 100, 10)},
         "name": "fixed"}


def objective(config) -> float:
    """A toy 'accuracy' with one best cell (depth 6, width 128, lr 1e-2)."""
    import math

    model, train = config["model"], config["train"]  # nested, as the space (Tune's shape)
    return (-abs(model["depth"] - 6) - abs(math.log2(model["width"] / 128))
            - abs(math.log10(train["lr"]) + 2))


def drive(searcher, trials: int, *, start: int = 0) -> list[dict]:
    return drive_searcher(searcher, objective, trials, start=start)


def test_space_samples_within_domains_and_keeps_constants():
    import numpy as np

    space, rng = Space(SPACE), np.random.default_rng(0)
    for _ in range(200):
        c = space.sample(rng)
        assert c["name"] == "fixed" and 1e-4 <= c["train.lr"] <= 1e-1
        assert 8 <= c["train.batch_size"] < 65 and c["train.warmup"] % 10 == 0
        m = space.mutate(c, rng)
        assert sum(m[k] != c[k] for k in c) <= 1 and 8 <= m["train.batch_size"] < 65
    with pytest.raises(ValueError, match="grid_search"):
        Space({"lr": tune.grid_search([1, 2])})


@pytest.mark.parametrize("cls", [RandomSearcher, EvolutionSearcher])
def test_same_seed_same_suggestions_and_budget(cls):
    a = drive(cls(SPACE, metric="acc", mode="max", seed=3, max_trials=40), 40)
    b = drive(cls(SPACE, metric="acc", mode="max", seed=3, max_trials=40), 40)
    c = drive(cls(SPACE, metric="acc", mode="max", seed=4, max_trials=40), 40)
    assert a == b and a != c
    searcher = cls(SPACE, metric="acc", mode="max", seed=3, max_trials=2)
    drive(searcher, 2)
    assert searcher.suggest("t2") == "FINISHED"


@pytest.mark.parametrize("cls", [RandomSearcher, EvolutionSearcher])
def test_save_restore_resumes_with_the_same_next_suggestions(cls, tmp_path):
    whole = drive(cls(SPACE, metric="acc", mode="max", seed=1, population=10, tournament=3)
                  if cls is EvolutionSearcher else cls(SPACE, metric="acc", mode="max", seed=1), 30)
    kwargs = {"population": 10, "tournament": 3} if cls is EvolutionSearcher else {}
    first = cls(SPACE, metric="acc", mode="max", seed=1, **kwargs)
    drive(first, 17)
    first.save(str(tmp_path / "s.json"))
    again = cls(SPACE, metric="acc", mode="max", seed=99, **kwargs)  # seed comes from the file
    again.restore(str(tmp_path / "s.json"))
    rest = []
    for i in range(17, 30):
        config = again.suggest(f"t{i}")
        rest.append(config)
        again.on_trial_complete(f"t{i}", {"acc": objective(config)})
    assert whole[17:] == rest


def test_failed_trials_are_not_results_and_evolution_beats_random_on_the_toy_objective():
    evo = EvolutionSearcher(SPACE, metric="acc", mode="max", seed=0, population=5, tournament=2)
    config = evo.suggest("x")
    evo.on_trial_complete("x", None, error=True)
    assert evo.history == [(evo.space.flat(config), None)] and len(evo.population) == 0
    # over 10 seeds at 60 trials, regularized evolution's best beats random search's on average
    best = {"evo": [], "random": []}
    for seed in range(10):
        for name, cls in (("evo", EvolutionSearcher), ("random", RandomSearcher)):
            kwargs = {"population": 10, "tournament": 3} if cls is EvolutionSearcher else {}
            searcher = cls(SPACE, metric="acc", mode="max", seed=seed, **kwargs)
            best[name].append(max(objective(c) for c in drive(searcher, 60)))
    assert sum(best["evo"]) > sum(best["random"]), best


@pytest.mark.slow
def test_evolution_searcher_drives_a_real_tuner(ray_session, tmp_path):
    def trainable(config):
        tune.report({"acc": objective(config)})

    searcher = EvolutionSearcher(SPACE, metric="acc", mode="max", seed=0, max_trials=12,
                                 population=4, tournament=2)
    results = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="evo")).fit()
    assert len(results) == 12 and not results.errors
    assert {r.config["name"] for r in results} == {"fixed"}
    assert results.get_best_result("acc", "max").metrics["acc"] == max(
        r.metrics["acc"] for r in results)


def test_evolution_with_a_canonical_form_does_not_retrain_a_known_model():
    # "noise" never shapes the model: without a canonical form, mutating it re-trains a parent
    space = {"a": tune.choice(list(range(6))), "b": tune.choice(list(range(6))),
             "noise": tune.choice(list(range(50)))}

    def canonical(config):
        return {"a": config["a"], "b": config["b"]}

    def repeats(searcher):
        seen, dup = set(), 0
        for i in range(30):
            config = searcher.suggest(f"t{i}")
            key = (config["a"], config["b"])
            dup += key in seen
            seen.add(key)
            searcher.on_trial_complete(f"t{i}", {"acc": config["a"] + config["b"]})
        return dup

    plain = EvolutionSearcher(space, metric="acc", mode="max", seed=0, population=4, tournament=2,
                              dedupe=False)
    deduped = EvolutionSearcher(space, metric="acc", mode="max", seed=0, population=4, tournament=2,
                                canonical=canonical)
    assert repeats(deduped) < repeats(plain)
    assert repeats(EvolutionSearcher(space, metric="acc", mode="max", seed=1, population=4,
                                     tournament=2, canonical=canonical)) <= 4  # random-phase only


@pytest.mark.parametrize("cls", [RandomSearcher, RLSearcher])
def test_dedupe_spends_no_trial_on_a_point_already_tried(cls):
    small = {"a": tune.choice([1, 2, 3]), "b": tune.choice(["x", "y"])}  # 6 points

    def drawn(dedupe: bool, seed: int) -> list[tuple]:
        s = cls(space=small, metric="m", mode="max", seed=seed, dedupe=dedupe)
        out = []
        for i in range(6):
            c = s.suggest(f"t{i}")
            out.append((c["a"], c["b"]))
            s.on_trial_complete(f"t{i}", {"m": c["a"]})
        return out

    assert all(len(set(drawn(True, seed))) == 6 for seed in range(5))  # every point once
    assert any(len(set(drawn(False, seed))) < 6 for seed in range(5))  # repeats otherwise


def _tpe(seed: int = 0):
    from ray.tune.search.optuna import OptunaSearch

    space = {"a": tune.choice([0, 1, 2]), "b": tune.choice([0, 1, 2]), "c": tune.choice([0, 1])}
    return OptunaSearch(space=space, metric="acc", mode="max", seed=seed)


def _score(config):
    return config["a"] + 0.5 * config["b"] - config["c"]


def test_skip_repeats_trains_every_point_once_and_tells_tpe_the_earlier_result():
    from bigopt.search.searchers import SkipRepeats

    raw = drive_searcher(_tpe(), _score, 14)
    assert len({json.dumps(c, sort_keys=True) for c in raw}) < 14  # TPE alone repeats points
    searcher = SkipRepeats(_tpe())
    configs = drive_searcher(searcher, _score, 14)
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == 14  # 14 of the 18 points
    assert searcher.skipped > 0
    # the inner study saw the repeats as trials completed with the earlier trial's value
    study = searcher.searcher._ot_study
    values = {}
    for trial in study.trials:
        key = json.dumps(trial.params, sort_keys=True)
        assert values.setdefault(key, trial.value) == trial.value
    assert len(study.trials) == 14 + searcher.skipped


def test_skip_repeats_returns_a_repeat_when_the_space_is_spent_and_resumes(tmp_path):
    from bigopt.search.searchers import SkipRepeats

    searcher = SkipRepeats(_tpe(), max_redraws=5)
    # 18 points, 20 trials: once the space is spent a repeat is trained, never a hang or None
    configs = drive_searcher(searcher, _score, 20)
    assert all(isinstance(c, dict) for c in configs)
    # through Tune's own path: save_to_dir renames the one file save() writes
    searcher.save_to_dir(str(tmp_path), "s")
    again = SkipRepeats(_tpe())
    again.restore_from_dir(str(tmp_path))
    assert (again.done, again.skipped) == (searcher.done, searcher.skipped)
    assert len(again.searcher._ot_study.trials) == len(searcher.searcher._ot_study.trials)
    assert isinstance(again.suggest("t20"), dict)


def test_the_tpe_a_spec_builds_skips_repeats_of_the_model_deciding_point():
    from bigopt.search.searchers import SkipRepeats
    from bigopt.search.spec import SearchSpec
    from bigopt.search.stage import build_searcher

    search = SearchSpec.model_validate({"searcher": "tpe", "num_trials": 4})
    built = build_searcher(search, {"train.lr": tune.choice([0.1, 0.2])}, "acc", "max")
    assert isinstance(built, SkipRepeats)


ALL = [RandomSearcher, EvolutionSearcher, RLSearcher]


@pytest.mark.parametrize("cls", ALL)
def test_space_metric_and_mode_may_come_from_the_tuner(cls):
    # as Tune's own searchers: built bare, told the space, metric and mode by the Tuner
    bare = cls(seed=5)
    with pytest.raises(RuntimeError, match="no search space"):
        bare.suggest("t0")
    assert bare.set_search_properties("acc", "max", SPACE) is True
    built = cls(SPACE, metric="acc", mode="max", seed=5)
    assert drive(bare, 12) == drive(built, 12)  # the same searcher either way
    # a space given to the constructor stays: Tune then refuses a param_space with domains
    assert built.set_search_properties("acc", "max", {"x": tune.choice([1, 2])}) is False
    only_space = cls(SPACE, seed=5)
    with pytest.raises(RuntimeError, match="metric and mode are not set"):
        only_space.suggest("t0")
    only_space.set_search_properties("acc", "max", {})  # TuneConfig's metric and mode
    assert only_space.suggest("t0") == cls(SPACE, "acc", "max", seed=5).suggest("t0")
    with pytest.raises(ValueError, match="mode"):
        cls(seed=5).set_search_properties("acc", "maximum", SPACE)


@pytest.mark.parametrize("cls", ALL)
def test_configs_come_back_in_the_space_shape(cls):
    searcher = cls(SPACE, metric="acc", mode="max", seed=0)
    config = searcher.suggest("t0")
    assert set(config) == {"model", "train", "name"} and set(config["model"]) == {"depth", "width"}
    assert searcher.space.nest(searcher.space.flat(config)) == config
    assert searcher.live["t0"] == searcher.space.flat(config)  # kept flat inside
    flat = cls({"train.lr": tune.loguniform(1e-4, 1e-1)}, "acc", "max").suggest("t0")
    assert set(flat) == {"train.lr"}  # a dotted key is a key: bigopt's spec paths stay flat
    with pytest.raises(ValueError, match="named twice"):
        Space({"train.lr": tune.uniform(0, 1), "train": {"lr": tune.uniform(0, 1)}})


@pytest.mark.slow
def test_searchers_in_tunes_own_usage_patterns(ray_session, tmp_path):
    """Tune's documented patterns with each searcher built bare: param_space and metric/mode
    from the Tuner, a ConcurrencyLimiter, a scheduler, and Tuner.restore of an interrupted
    experiment."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    def trainable(config):
        for step in range(1, 5):  # the scheduler's rungs
            tune.report({"acc": objective(config) - 1.0 / step, "step": step})

    for cls in ALL:
        searcher = ConcurrencyLimiter(cls(seed=0), max_concurrent=2)
        results = tune.Tuner(
            trainable, param_space=SPACE,
            tune_config=tune.TuneConfig(search_alg=searcher, metric="acc", mode="max", num_samples=10,
                                        scheduler=ASHAScheduler(time_attr="step", max_t=4,
                                                                grace_period=1)),
            run_config=tune.RunConfig(storage_path=str(tmp_path), name=f"docs-{cls.__name__}",
                                      verbose=0)).fit()
        assert len(results) == 10 and not results.errors
        assert all(r.config["name"] == "fixed" and r.config["model"]["depth"] in range(1, 9)
                   for r in results)  # the nested shape the trainable was written for
        inner = searcher.searcher
        assert len(inner.history) == 10 and inner.metric == "acc" and inner.mode == "max"
        assert sum(r.metrics["step"] < 4 for r in results) > 0  # ASHA stopped some early

    # Tuner.restore after Ctrl+C: the fifth trial interrupts the driver (SIGINT, as a user's
    # Ctrl+C; Tune saves the experiment and returns). The restored searcher goes on from its
    # saved state, space, metric and mode included (Tune does not pass them again), so its
    # budget (max_trials=8) holds: one starting afresh would suggest 8 more
    import os
    import signal
    import time

    driver, ran = os.getpid(), tmp_path / "ran"

    def interrupting(config):
        ran.mkdir(exist_ok=True)
        if len(list(ran.iterdir())) == 4 and not (tmp_path / "interrupted").exists():
            (tmp_path / "interrupted").write_text("")
            os.kill(driver, signal.SIGINT)
            time.sleep(60)  # stopped by Tune before this ends
        (ran / tune.get_context().get_trial_id()).write_text("")
        tune.report({"acc": objective(config)})

    for cls in ALL:
        for f in [*ran.glob("*"), *tmp_path.glob("interrupted")]:
            f.unlink()
        name = f"restore-{cls.__name__}"
        options = {"population": 3, "tournament": 2} if cls is EvolutionSearcher else {}
        first = tune.Tuner(
            interrupting, param_space=SPACE,
            tune_config=tune.TuneConfig(search_alg=cls(seed=1, max_trials=8, **options),
                                        metric="acc", mode="max", num_samples=-1,
                                        max_concurrent_trials=1),
            run_config=tune.RunConfig(storage_path=str(tmp_path), name=name, verbose=0)).fit()
        assert len(first) < 8, cls
        path = str(tmp_path / name)
        assert tune.Tuner.can_restore(path)
        results = tune.Tuner.restore(path, interrupting, resume_unfinished=True).fit()
        assert len(results) == 8 and not results.errors, cls
        keys = [json.dumps(r.config, sort_keys=True) for r in results]
        assert len(set(keys)) == 8, cls  # no point tried twice across the interruption


@pytest.mark.parametrize("cls", [EvolutionSearcher, RLSearcher])
def test_the_last_trials_retrain_the_best_challengers_with_new_seeds(cls, tmp_path):
    options = {"population": 5, "tournament": 2} if cls is EvolutionSearcher else {}
    searcher = cls(SPACE, "acc", "max", seed=2, max_trials=30, reevaluate=4, seed_key="seed",
                   **options)
    configs = drive(searcher, 26)
    assert all("seed" not in c for c in configs)  # a new point each until the last 4
    before = [dict(c) for c, _ in searcher.history]
    flat = [searcher.space.flat(c) for c in configs]
    ranked = sorted(range(26), key=lambda i: -objective(configs[i]))  # the toy has no noise
    policy = json.dumps(searcher.get_state().get("policy"))
    again = drive(searcher, 30, start=26)
    seeds = [c.pop("seed") for c in again]
    assert len(set(seeds)) == 4  # each a new training run
    retrained = [searcher.space.flat(c) for c in again]
    # the two best challengers (never the incumbent, whose best run is the one reported),
    # the one with fewer runs first: each twice
    challengers = [flat[i] for i in ranked[1:3]]
    assert retrained == [challengers[0], challengers[1], challengers[0], challengers[1]]
    assert flat[ranked[0]] not in retrained
    # kept as the point (no seed) beside its first run; the policy learns nothing from them
    assert [c for c, _ in searcher.history] == before + retrained
    assert json.dumps(searcher.get_state().get("policy")) == policy
    assert searcher.suggest("t30") == "FINISHED"


def test_reevaluation_resumes_and_needs_a_budget(tmp_path):
    whole = EvolutionSearcher(SPACE, "acc", "max", seed=4, max_trials=20, reevaluate=3,
                              seed_key="seed", population=5, tournament=2)
    expected = drive(whole, 20)
    first = EvolutionSearcher(SPACE, "acc", "max", seed=4, max_trials=20, reevaluate=3,
                              seed_key="seed", population=5, tournament=2)
    drive(first, 18)
    live = first.suggest("t18")  # saved with a re-evaluation in flight
    first.save(str(tmp_path / "s.json"))
    again = EvolutionSearcher(SPACE, "acc", "max", seed=0, max_trials=20, reevaluate=3,
                              seed_key="seed", population=5, tournament=2)
    again.restore(str(tmp_path / "s.json"))
    again.on_trial_complete("t18", {"acc": objective(live)})
    assert [live, *drive(again, 20, start=19)] == expected[18:]
    # without a budget there is no "end" to re-evaluate at: every trial a new point
    unbounded = EvolutionSearcher(SPACE, "acc", "max", seed=4, reevaluate=3, seed_key="seed",
                                  population=5, tournament=2)
    assert all("seed" not in c for c in drive(unbounded, 20))
    with pytest.raises(ValueError, match="reevaluate"):
        EvolutionSearcher(SPACE, "acc", "max", reevaluate=-1)
