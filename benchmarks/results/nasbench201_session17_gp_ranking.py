"""Scratch: EvolutionSearcher whose k children are ranked by a GP's expected improvement."""
from __future__ import annotations
import sys, os, time, statistics, math, warnings
sys.path.insert(0, "/work/main/benchmarks")
warnings.filterwarnings("ignore")
import numpy as np
from scipy.stats import norm
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, WhiteKernel, ConstantKernel, Matern
import search_nasbench as sn
from bigopt.search import EvolutionSearcher

OPS = sn.OPS

def onehot(configs):
    x = np.zeros((len(configs), 30))
    for i, c in enumerate(configs):
        for e in range(6):
            x[i, e * 5 + OPS.index(c[f"Op{e}"])] = 1.0
    return x

class GPEvo(EvolutionSearcher):
    def __init__(self, *a, acq="ei", xi=0.0, kappa=1.0, blend=0.0, ard=False, **kw):
        super().__init__(*a, **kw)
        self.acq, self.xi, self.kappa, self.blend, self.ard = acq, xi, kappa, blend, ard

    def _choose(self, options, config_of, density=None):
        if len(options) == 1:
            return options[0]
        scored = [(c, s) for c, s in self.history if s is not None]
        if len(scored) < self.SURROGATE_MIN_TRIALS:
            return options[0]
        X = onehot([c for c, _ in scored]); y = np.array([s for _, s in scored])
        ls = np.ones(30) if self.ard else 1.0
        kern = ConstantKernel(1.0) * RBF(length_scale=ls, length_scale_bounds=(0.05, 20)) + WhiteKernel(0.1, (1e-4, 1.0))
        gp = GaussianProcessRegressor(kern, normalize_y=True, n_restarts_optimizer=0, random_state=0)
        gp.fit(X, y)
        Xc = onehot([config_of(o) for o in options])
        mu, sd = gp.predict(Xc, return_std=True)
        if self.acq == "ei":
            best = gp.predict(X).max()
            z = (mu - best - self.xi) / np.maximum(sd, 1e-9)
            a = (mu - best - self.xi) * norm.cdf(z) + sd * norm.pdf(z)
        elif self.acq == "ucb":
            a = mu + self.kappa * sd
        elif self.acq == "mean":
            a = mu
        if self.blend:
            d = density or self._density()
            r = d.score([config_of(o) for o in options])
            # rank blend
            a = np.argsort(np.argsort(a)) + self.blend * np.argsort(np.argsort(r))
        return options[int(np.argmax(a))]

def make(name, seed, q):
    if name == "default":
        return sn.make_searcher("evolution-default", seed, q)
    if name == "tpe":
        return sn.make_searcher("tpe", seed, q)
    parts = dict(p.split("=") for p in name.split(",")) if "=" in name else {}
    kw = dict(population=8, tournament=3, candidates=int(parts.pop("k", 8)), guided=float(parts.pop("g", 0.5)))
    acq = parts.pop("acq", "ei")
    extra = {k: float(v) for k, v in parts.items() if k in ("xi", "kappa", "blend")}
    if parts.get("ard"): extra["ard"] = True
    return GPEvo(sn.SPACE, sn.METRIC, "max", seed=seed, max_trials=q, acq=acq, **kw, **extra)

_tables = {}
def one(args):
    name, ds, seed = args
    if ds not in _tables:
        _tables[ds] = sn.load_table(sn.DATASETS[ds])
    t = _tables[ds]
    sn._quiet()
    return sn.best_of(sn.drive(make(name, seed, 100), t, seed, 100), t)[0]

if __name__ == "__main__":
    import multiprocessing as mp
    names = sys.argv[1].split(";")
    ds = sys.argv[2]
    first, n = int(sys.argv[3]), int(sys.argv[4])
    seeds = range(first, first + n)
    t0 = time.time()
    with mp.Pool(2) as pool:
        res = {nm: pool.map(one, [(nm, ds, s) for s in seeds]) for nm in names}
    base = res[names[0]]
    for nm in names:
        m = statistics.fmean(res[nm]); se = statistics.stdev(res[nm]) / math.sqrt(n)
        d = [a - b for a, b in zip(res[nm], base)]
        dm = statistics.fmean(d); dse = statistics.stdev(d) / math.sqrt(n) if any(d) else 0
        w = sum(x > 0 for x in d); l = sum(x < 0 for x in d)
        print(f"{ds} seeds {first}-{first+n-1} | {nm:30s} | {m:.3f} +- {se:.3f} | vs {names[0]}: {dm:+.3f} +- {dse:.3f} ({w}/{n-w-l}/{l})", flush=True)
    print(f"wall {time.time()-t0:.0f} s")
