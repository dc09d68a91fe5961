"""Session 17 scratch (tried, not kept): EvolutionSearcher whose k children are ranked by a
Gaussian process on one-hot features instead of TPE's l/g. Results in
``nasbench201_surrogate_tuning.md``.

    python benchmarks/results/nasbench201_session17_gp_ranking.py "default;tpe;k=8" CIFAR-10 100 90
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import search_nasbench as sn  # noqa: E402
from scipy.stats import norm  # noqa: E402
from sklearn.gaussian_process import GaussianProcessRegressor  # noqa: E402
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel  # noqa: E402

from bigopt.search import EvolutionSearcher  # noqa: E402

warnings.filterwarnings("ignore")  # the GP's convergence warnings, per suggestion


def onehot(configs: list[dict]) -> np.ndarray:
    x = np.zeros((len(configs), 30))
    for i, config in enumerate(configs):
        for edge in range(6):
            x[i, edge * 5 + sn.OPS.index(config[f"Op{edge}"])] = 1.0
    return x


class GPEvo(EvolutionSearcher):
    def __init__(self, *args, acq: str = "ei", xi: float = 0.0, kappa: float = 1.0,
                 blend: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.acq, self.xi, self.kappa, self.blend = acq, xi, kappa, blend

    def _choose(self, options, config_of, density=None):
        scored = [(c, s) for c, s in self.history if s is not None]
        if len(options) == 1 or len(scored) < self.SURROGATE_MIN_TRIALS:
            return options[0]
        x, y = onehot([c for c, _ in scored]), np.array([s for _, s in scored])
        kernel = (ConstantKernel(1.0) * RBF(1.0, length_scale_bounds=(0.05, 20))
                  + WhiteKernel(0.1, (1e-4, 1.0)))
        gp = GaussianProcessRegressor(kernel, normalize_y=True, random_state=0).fit(x, y)
        configs = [config_of(o) for o in options]
        mu, sd = gp.predict(onehot(configs), return_std=True)
        if self.acq == "ei":
            gain = mu - gp.predict(x).max() - self.xi
            z = gain / np.maximum(sd, 1e-9)
            value = gain * norm.cdf(z) + sd * norm.pdf(z)
        else:  # ucb
            value = mu + self.kappa * sd
        if self.blend:
            ratio = (density or self._density()).score(configs)
            value = np.argsort(np.argsort(value)) + self.blend * np.argsort(np.argsort(ratio))
        return options[int(np.argmax(value))]


def make(name: str, seed: int, queries: int):
    if name in ("default", "tpe"):
        return sn.make_searcher("evolution-default" if name == "default" else "tpe", seed, queries)
    parts = dict(p.split("=") for p in name.split(","))
    options = {k: float(parts[k]) for k in ("xi", "kappa", "blend") if k in parts}
    return GPEvo(sn.SPACE, sn.METRIC, "max", seed=seed, max_trials=queries, population=8,
                 tournament=3, candidates=int(parts.get("k", 8)),
                 guided=float(parts.get("g", 0.5)), acq=parts.get("acq", "ei"), **options)


_tables: dict = {}


def one(args: tuple[str, str, int]) -> float:
    name, label, seed = args
    table = _tables.setdefault(label, sn.load_table(sn.DATASETS[label]))
    sn._quiet()
    return sn.best_of(sn.drive(make(name, seed, 100), table, seed, 100), table)[0]


if __name__ == "__main__":
    names, label, first, n = sys.argv[1].split(";"), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    started = time.time()
    with multiprocessing.Pool(2) as pool:
        res = {name: pool.map(one, [(name, label, s) for s in range(first, first + n)])
               for name in names}
    for name in names:
        diffs = [a - b for a, b in zip(res[name], res[names[0]], strict=True)]
        wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        print(f"{label} seeds {first}-{first + n - 1} | {name:30s} | {statistics.fmean(res[name]):.3f} "
              f"+- {statistics.stdev(res[name]) / math.sqrt(n):.3f} | vs {names[0]}: "
              f"{statistics.fmean(diffs):+.3f} +- {statistics.stdev(diffs) / math.sqrt(n):.3f} "
              f"({wins}/{n - wins - losses}/{losses})", flush=True)
    print(f"wall {time.time() - started:.0f} s")
