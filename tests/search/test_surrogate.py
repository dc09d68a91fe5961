"""The density-ratio surrogate that ranks candidate points (TPE's l/g), and the searchers that
use it (``candidates`` > 1)."""

from __future__ import annotations

import numpy as np
import pytest
from ray import tune

from bigopt.search import EvolutionSearcher, RLSearcher
from bigopt.search.space import Space
from bigopt.search.surrogate import DensityRatio

from factories import drive_searcher

SPACE = {"width": tune.choice([[8, 8], [16, 16], [32, 32]]),  # unhashable choices
         "op": tune.choice(["conv", "pool", "none"]),
         "lr": tune.loguniform(1e-4, 1e-1)}


def test_density_ratio_prefers_the_values_of_the_good_trials():
    space = Space(SPACE)
    good = [{"width": [32, 32], "op": "conv", "lr": 1e-2}] * 3
    bad = [{"width": [8, 8], "op": "none", "lr": 1e-4}] * 9
    model = DensityRatio(space).fit(good + bad, [1.0] * 3 + [0.0] * 9)
    a, b, mixed = ({"width": [32, 32], "op": "conv", "lr": 1.1e-2},
                   {"width": [8, 8], "op": "none", "lr": 1.1e-4},
                   {"width": [32, 32], "op": "none", "lr": 1e-4})
    scores = model.score([a, b, mixed])
    assert scores[0] > scores[2] > scores[1]
    # a value never seen scores between the two: smoothed, not infinite
    unseen = model.score([{"width": [16, 16], "op": "pool", "lr": 1e-3}])[0]
    assert scores[1] < unseen < scores[0] and np.isfinite(unseen)


def objective(config) -> float:
    return ({"conv": 1.0, "pool": 0.5, "none": 0.0}[config["op"]] + config["width"][0] / 32
            - abs(np.log10(config["lr"]) + 2))


def drive(searcher, trials: int, *, start: int = 0) -> list[dict]:
    return drive_searcher(searcher, objective, trials, start=start)


@pytest.mark.parametrize("cls,kwargs", [(EvolutionSearcher, {"population": 6, "tournament": 2}),
                                        (EvolutionSearcher, {"population": 6, "tournament": 2,
                                                             "guided": 0.5}),
                                        (EvolutionSearcher, {"population": 6, "tournament": 2,
                                                             "guided": 0.5, "crossover": 0.5,
                                                             "fresh": 2}),
                                        (RLSearcher, {})])
def test_candidates_are_reproducible_and_survive_a_save_and_restore(cls, kwargs, tmp_path):
    make = lambda seed: cls(SPACE, "acc", "max", seed=seed, candidates=8, **kwargs)  # noqa: E731
    whole = drive(make(5), 30)
    assert whole == drive(make(5), 30) and whole != drive(make(6), 30)
    first = make(5)
    drive(first, 18)
    first.save(str(tmp_path / "state.json"))
    again = make(99)
    again.restore(str(tmp_path / "state.json"))
    assert drive(again, 30, start=18) == whole[18:]
    with pytest.raises(ValueError, match="candidates"):
        cls(SPACE, "acc", "max", candidates=0, **kwargs)


@pytest.mark.parametrize("cls,kwargs", [(EvolutionSearcher, {"population": 6, "tournament": 2}),
                                        (RLSearcher, {})])
def test_ranked_candidates_find_better_points_than_one_draw(cls, kwargs):
    """Over 20 seeds of 30 trials, the mean score of the trials tried (not only the best: the
    ranking should steer every trial) is higher with 8 ranked candidates than with 1."""
    means = {}
    for k in (1, 8):
        means[k] = np.mean([np.mean([objective(c) for c in drive(
            cls(SPACE, "acc", "max", seed=seed, candidates=k, **kwargs), 30)])
            for seed in range(20)])
    assert means[8] > means[1] + 0.1, means


def test_propose_draws_other_values_from_the_good_trials_density():
    space = Space({**SPACE, "depth": tune.randint(1, 9)})
    good = [{"width": [32, 32], "op": "conv", "lr": 1e-2, "depth": 8}] * 6
    bad = [{"width": [8, 8], "op": "none", "lr": 1e-4, "depth": 1}] * 18
    model = DensityRatio(space).fit(good + bad, [1.0] * 6 + [0.0] * 18)
    rng = np.random.default_rng(0)
    dims = {d.path: d for d in space.dims}
    ops = [model.propose(dims["op"], "pool", rng) for _ in range(300)]
    assert "pool" not in ops and ops.count("conv") > 0.75 * len(ops)  # never the current level
    lrs = [model.propose(dims["lr"], 1e-4, rng) for _ in range(300)]
    assert all(1e-4 <= v <= 1e-1 for v in lrs) and np.median(np.log10(lrs)) > -3
    depths = [model.propose(dims["depth"], 1, rng) for _ in range(300)]
    assert all(isinstance(d, int) and 1 < d <= 8 for d in depths) and depths.count(8) > 150
    with pytest.raises(ValueError, match="guided"):
        EvolutionSearcher(SPACE, "acc", "max", guided=1.5)


def test_sample_draws_whole_points_from_the_good_trials_density():
    """``fresh`` candidates: every value from l(x) on its own, constants kept, within domains."""
    space = Space({**SPACE, "depth": tune.randint(1, 9), "epochs": 3})
    good = [{"width": [32, 32], "op": "conv", "lr": 1e-2, "depth": 8}] * 6
    bad = [{"width": [8, 8], "op": "none", "lr": 1e-4, "depth": 1}] * 18
    model = DensityRatio(space).fit(good + bad, [1.0] * 6 + [0.0] * 18)
    rng = np.random.default_rng(0)
    points = [model.sample(rng) for _ in range(300)]
    assert all(p["epochs"] == 3 for p in points)
    assert sum(p["op"] == "conv" for p in points) > 0.6 * len(points)  # 7/10 of l(x)'s mass
    assert sum(p["width"] == [32, 32] for p in points) > 0.6 * len(points)
    assert all(1e-4 <= p["lr"] <= 1e-1 for p in points)
    assert all(isinstance(p["depth"], int) and 1 <= p["depth"] <= 8 for p in points)
    # unlike propose, the good trials' own value is not excluded
    assert sum(p["depth"] == 8 for p in points) > 150


def test_crossover_and_fresh_options_are_checked_and_change_the_search():
    with pytest.raises(ValueError, match="crossover"):
        EvolutionSearcher(SPACE, "acc", "max", crossover=1.5)
    with pytest.raises(ValueError, match="fresh"):
        EvolutionSearcher(SPACE, "acc", "max", candidates=4, fresh=4)
    make = lambda **kw: EvolutionSearcher(SPACE, "acc", "max", seed=3, population=6,  # noqa: E731
                                          tournament=2, candidates=6, guided=0.5, **kw)
    plain = drive(make(), 30)
    assert plain[:6] == drive(make(crossover=1.0, fresh=2), 30)[:6]  # the random first population
    assert plain != drive(make(crossover=1.0), 30) and plain != drive(make(fresh=2), 30)


def test_spec_defaults_build_the_measured_evolution_and_candidates_1_stays_plain():
    """The search stage's builder passes the spec's evolution defaults (BENCHMARKS 5a, session
    18), and ``candidates: 1`` (the paper's algorithm) leaves no room for fresh draws."""
    from bigopt.search.spec import SearchSpec
    from bigopt.search.stage import build_searcher

    built = build_searcher(SearchSpec.model_validate({"searcher": "evolution"}), SPACE, "acc", "max")
    assert (built.population_size, built.tournament, built.candidates, built.crossover,
            built.fresh, built.guided) == (8, 3, 6, 0.5, 2, 0.5)
    plain = build_searcher(SearchSpec.model_validate(
        {"searcher": "evolution", "evolution": {"candidates": 1}}), SPACE, "acc", "max")
    assert (plain.candidates, plain.fresh) == (1, 0)
