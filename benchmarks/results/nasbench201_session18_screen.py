"""Session 18 screen: evolution variants on NAS-Bench-201 over many seeds, paired.

python benchmarks/results/nasbench201_session18_screen.py "default;tpe;x=0.5" CIFAR-10 10000 2000 \
    [procs] [out.json]
Variants are ';'-separated; each is 'k=v,k=v' options of EVar (or 'default' / 'tpe' / 'rl').
Options: x crossover probability; cand candidates; mix candidates drawn from l(x) per dimension;
rp/rm/rtop/rskip re-train a top cell by mean with probability rp; endr/endk re-train the endk
best-observed challengers in the last endr trials; gamma, pop, tour, guided; elite (percent
of children bred from the best trial so far); cend (candidates ramp linearly from cand to cend
after the first population; session 19).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import numpy as np  # noqa: E402
import search_nasbench as sn  # noqa: E402

from bigopt.search import EvolutionSearcher  # noqa: E402


class EVar(EvolutionSearcher):
    """Default evolution (population 8, tournament 3, 8 candidates, guided 0.5) plus options."""

    def __init__(self, seed: int, queries: int, x: float = 0.0, rp: float = 0.0, rm: int = 2,
                 rtop: int = 3, rskip: int = 1, endr: int = 0, endk: int = 2, gamma: float = 0.25,
                 pop: int = 8, tour: int = 3, cand: int = 8, guided: float = 0.5,
                 lastpop: int = 0, elite: int = 0, mix: int = 0, cend: int = 0):
        super().__init__(sn.SPACE, sn.METRIC, "max", seed=seed, max_trials=queries,
                         population=pop, tournament=tour, candidates=cand, guided=guided)
        self.x, self.rp, self.rm, self.rtop, self.rskip = x, rp, rm, rtop, rskip
        self.endr, self.endk, self.gamma, self.elite = endr, endk, gamma, elite
        self.obs: dict[str, list[float]] = {}
        self.mix = mix
        self.cand0, self.cend = cand, cend  # cend: candidates ramp linearly to cend

    def on_trial_complete(self, trial_id, result=None, error=False):
        config = self.live.get(trial_id)
        super().on_trial_complete(trial_id, result, error)
        if config is not None and not error:
            self.obs.setdefault(self._key(config), []).append(self.score(result))

    def _density(self):
        scored = [(c, s) for c, s in self.history if s is not None]
        if len(scored) < self.SURROGATE_MIN_TRIALS:
            return None
        from bigopt.search.surrogate import DensityRatio

        return DensityRatio(self.space, gamma=self.gamma).fit([c for c, _ in scored],
                                                              [s for _, s in scored])

    def _cfg(self, key):
        import json
        return json.loads(key)

    def _incumbent(self):
        return max(self.obs, key=lambda k: max(self.obs[k]))

    def _next_config(self):
        full = len(self.population) >= self.population_size
        if self.cend and full:
            frac = (self.suggested - self.population_size) / max(1, self.max_trials - self.population_size)
            self.candidates = max(self.mix + 1, round(self.cand0 + frac * (self.cend - self.cand0)))
        left = self.max_trials - self.suggested
        if full and self.endr and left <= self.endr:
            inc = self._incumbent()
            ranked = sorted(self.obs, key=lambda k: -max(self.obs[k]))
            pool = [k for k in ranked if not (self.rskip and k == inc)][: self.endk]
            if pool:
                key = min(pool, key=lambda k: len(self.obs[k]))
                return self._cfg(key)
        if full and self.rp and self.rng.random() < self.rp:
            inc = self._incumbent()
            ranked = sorted(self.obs, key=lambda k: -statistics.fmean(self.obs[k]))
            pool = [k for k in ranked[: self.rtop] if len(self.obs[k]) < self.rm
                    and not (self.rskip and k == inc)]
            if pool:
                key = min(pool, key=lambda k: len(self.obs[k]))
                return self._cfg(key)
        if not full or not self.mix:
            return super()._next_config()
        density = self._density()
        guide = density if self.guided > 0 else None
        options = [self._child(guide) for _ in range(self.candidates - self.mix)]
        if density is not None:
            options += [self._draw_l(density) for _ in range(self.mix)]
        return self._choose(options, lambda c: c, density)

    def _draw_l(self, density):
        """A fresh point, each dimension drawn from the good trials' density l(x) (TPE)."""
        from bigopt.search.surrogate import _levels

        def draw():
            out = {}
            for dim in self.space.dims:
                levels = _levels(dim, density.bins)
                w = np.exp(density._log_density(density.good, dim)[:levels])
                out[dim.path] = dim.domain.categories[int(self.rng.choice(levels, p=w / w.sum()))]
            return out
        return self._unseen(draw(), lambda _: draw())

    def _child(self, density=None):
        def winner():
            picks = self.rng.choice(len(self.population), size=self.tournament, replace=False)
            return max((self.population[int(i)] for i in picks), key=lambda m: m[1])[0]

        parent = winner()
        if self.elite and self.rng.random() < self.elite / 100:
            parent = max(((c, s) for c, s in self.history if s is not None), key=lambda m: m[1])[0]
        if self.x and self.rng.random() < self.x:
            other = winner()
            parent = {k: (parent[k] if self.rng.random() < 0.5 else other[k]) for k in parent}
        return self._unseen(self._mutate(parent, density), lambda c: self._mutate(c, density))


TABLES: dict[str, sn.Table] = {}


def one(args):
    variant, dataset, seed, queries = args
    if dataset not in TABLES:
        TABLES[dataset] = sn.load_table(sn.DATASETS[dataset])
    table = TABLES[dataset]
    if variant == "tpe":
        s = sn.make_searcher("tpe", seed, queries)
    elif variant == "default":
        s = sn.make_searcher("evolution-default", seed, queries)
    elif variant == "rl":
        s = sn.make_searcher("rl-default", seed, queries)
    else:
        opts = {}
        for kv in variant.split(","):
            k, v = kv.split("=")
            opts[k] = float(v) if "." in v else int(v)
        s = EVar(seed, queries, **opts)
    trace = sn.drive(s, table, seed, queries)
    acc, _ = sn.best_of(trace, table)
    return variant, dataset, seed, acc


def main():
    variants = sys.argv[1].split(";")
    datasets = sys.argv[2].split(",")
    first, n = int(sys.argv[3]), int(sys.argv[4])
    queries = 100
    sn._quiet()
    jobs = [(v, d, s, queries) for d in datasets for v in variants for s in range(first, first + n)]
    t0 = time.time()
    res: dict[tuple[str, str], dict[int, float]] = {}
    with mp.Pool(int(sys.argv[5]) if len(sys.argv) > 5 else 2, initializer=sn._quiet) as pool:
        for v, d, s, acc in pool.imap_unordered(one, jobs, chunksize=20):
            res.setdefault((v, d), {})[s] = acc
    print(f"seeds {first}-{first + n - 1}, {queries} queries, {time.time() - t0:.0f} s")
    import json
    if len(sys.argv) > 6:
        with open(sys.argv[6], "w") as f:
            json.dump({f"{v}|{d}": r for (v, d), r in res.items()}, f)
    base = variants[0]
    for d in datasets:
        b = res[(base, d)]
        print(f"\n{d}: base {base} {statistics.fmean(b.values()):.3f}")
        for v in variants:
            r = res[(v, d)]
            diffs = [r[s] - b[s] for s in b]
            m = statistics.fmean(diffs)
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0
            w = sum(x > 1e-9 for x in diffs)
            lo = sum(x < -1e-9 for x in diffs)
            print(f"  {v:40s} {statistics.fmean(r.values()):.3f}  {m:+.4f} +- {se:.4f}  "
                  f"{w}/{len(diffs) - w - lo}/{lo}")


if __name__ == "__main__":
    main()
