"""Searchers as plain Ray Tune ``Searcher``s: usable in any ``Tuner``, testable without Tune.

Each keeps ``trial_id -> config``, returns ``Searcher.FINISHED`` when its budget is spent,
treats ``error=True`` or a missing metric as a failed trial (never a result), draws only from
its own seeded generator, and saves/restores its whole state (``save``/``restore``), so an
interrupted search resumes with the same next suggestions.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from bigopt.search.space import Space


def point_key(config: dict[str, Any], canonical: Callable[[dict[str, Any]], Any]) -> str:
    """A point's identity: its ``canonical`` form (what decides the trained model) as JSON."""
    return json.dumps(canonical(config), sort_keys=True, default=str)


def _check_mode(mode: str | None) -> None:
    if mode is not None and mode not in ("min", "max"):
        raise ValueError(f"mode: {mode!r} must be 'min' or 'max'")


class _SeededSearcher(Searcher):
    """The shared part. ``space``, ``metric`` and ``mode`` may be left out, as for Tune's own
    searchers: the ``Tuner`` then passes its ``param_space`` and ``TuneConfig``'s metric and
    mode (``set_search_properties``). Configs go out in the space's own shape (nested where
    the param space is nested) and are kept flat inside (``Space``)."""

    def __init__(self, space: dict[str, Any] | None = None, metric: str | None = None,
                 mode: str | None = None, *, seed: int = 0, max_trials: int | None = None,
                 candidates: int = 1, reevaluate: int = 0, reevaluate_top: int = 2,
                 seed_key: str | None = None, budget: int | None = None):
        _check_mode(mode)
        if candidates < 1:
            raise ValueError(f"candidates: {candidates} must be >= 1")
        if reevaluate < 0 or reevaluate_top < 1:
            raise ValueError(f"reevaluate: {reevaluate} must be >= 0 and reevaluate_top: "
                             f"{reevaluate_top} >= 1")
        self.candidates = candidates
        self.reevaluate, self.reevaluate_top, self.seed_key = reevaluate, reevaluate_top, seed_key
        self.budget = budget if budget is not None else max_trials
        self.reevaluating: list[str] = []  # live trials that re-train a point
        super().__init__(metric=metric, mode=mode)
        self.space: Space | None = None
        self.seed, self.max_trials = seed, max_trials
        self.rng = np.random.default_rng(seed)
        self.live: dict[str, dict[str, Any]] = {}
        self.history: list[tuple[dict[str, Any], float | None]] = []  # completed, in order
        self.suggested = 0
        if space:
            self._set_space(space)

    def _set_space(self, space: dict[str, Any] | Space) -> None:
        self.space = space if isinstance(space, Space) else Space(space)
        self._on_space()

    def _on_space(self) -> None:
        """Builds what depends on the space (the RL policy); runs once, when it is known."""

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict[str, Any],
                              **spec: Any) -> bool:
        """Tune's hook: the ``Tuner``'s param space, metric and mode, for a searcher built
        without them. A space given to the constructor stays (False, as Tune's searchers
        answer: Tune then refuses a ``param_space`` holding domains); metric and mode fill in
        what the constructor left out."""
        _check_mode(mode)
        if self._metric is None and metric:
            self._metric = metric
        if self._mode is None and mode:
            self._mode = mode
        if self.space is not None or not config:
            return False
        self._set_space(config)
        return True

    def _budget_spent(self) -> bool:
        return self.max_trials is not None and self.suggested >= self.max_trials

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        name = type(self).__name__
        if self.space is None:
            raise RuntimeError(f"{name}: no search space: pass space= or a Tuner param_space "
                               "(Tuner.restore(..., param_space=...) where the saved state "
                               "could not hold it)")
        if not self.metric or not self.mode:
            raise RuntimeError(f"{name}: metric and mode are not set (metric={self.metric!r}, "
                               f"mode={self.mode!r}): pass them here or to tune.TuneConfig")
        if self._budget_spent():
            return Searcher.FINISHED
        config = self._reevaluation()
        if config is None:
            config = self._next_config()
        else:
            self.reevaluating.append(trial_id)
        self.live[trial_id] = config
        self.suggested += 1
        return self.space.nest(config)

    def _next_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def _reevaluation(self) -> dict[str, Any] | None:
        """In the last ``reevaluate`` trials of ``budget``: a point among the
        ``reevaluate_top`` best observed after the incumbent, the one with the fewest
        observations (in flight included), trained again, with a new seed under
        ``seed_key`` when set. None otherwise.

        Why: the search reports the point of the best *single* observation, and one training
        run's metric is noisy (another seed moves it); a challenger trained twice may show it
        beats the incumbent, which a new point cannot tell. Re-training the incumbent itself
        could never change what is reported. SMAC's intensification and re-evaluation in
        noisy evolution do the same; measured on NAS-Bench-201 in BENCHMARKS.md 5."""
        if not self.reevaluate or self.budget is None:
            return None
        started = sum(score is not None for _, score in self.history) + len(self.live)
        if self.budget - started > self.reevaluate:
            return None
        canonical = self.canonical or dict

        def key(config: dict[str, Any]) -> str:
            return point_key(config, canonical)

        observed: dict[str, tuple[dict[str, Any], list[float]]] = {}
        for config, score in self.history:
            if score is not None:
                observed.setdefault(key(config), (config, []))[1].append(score)
        in_flight = collections.Counter(key(self._stripped(t, c)) for t, c in self.live.items())
        ranked = sorted(observed, key=lambda k: -max(observed[k][1]))  # ties: first seen first
        pool = ranked[1:1 + self.reevaluate_top]
        if not pool:
            return None
        chosen = min(pool, key=lambda k: len(observed[k][1]) + in_flight[k])
        config = dict(observed[chosen][0])
        if self.seed_key is not None:
            config[self.seed_key] = int(self.rng.integers(2**31 - 1))
        return config

    def _stripped(self, trial_id: str, config: dict[str, Any]) -> dict[str, Any]:
        """A re-evaluation's config without its seed: the point it re-trains."""
        if trial_id in self.reevaluating and self.seed_key is not None:
            return {k: v for k, v in config.items() if k != self.seed_key}
        return config

    #: how many times a searcher with ``canonical`` set redraws a point it already tried
    MAX_REDRAWS = 20
    #: the form of a config that decides the trained model; None: repeats are allowed
    canonical: Callable[[dict[str, Any]], Any] | None = None

    def _key(self, config: dict[str, Any]) -> str:
        assert self.canonical is not None
        return point_key(config, self.canonical)

    def _tried(self) -> set[str]:
        """Keys of every point tried or running (failed and rejected ones included)."""
        return {self._key(c) for c, _ in self.history} | {self._key(c) for c in self.live.values()}

    def _unseen(self, config: dict[str, Any],
                redraw: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """``config``, or (with ``canonical`` set) ``redraw`` of it while it is a point already
        tried, up to ``MAX_REDRAWS`` times."""
        if self.canonical is None:
            return config
        seen = self._tried()
        for _ in range(self.MAX_REDRAWS):
            if self._key(config) not in seen:
                break
            config = redraw(config)
        return config

    #: completed trials before the surrogate ranks candidates (until then: the first one)
    SURROGATE_MIN_TRIALS = 8

    def _density(self) -> Any:
        """``DensityRatio`` (TPE's l/g) fitted on the completed trials; None while there are
        fewer than ``SURROGATE_MIN_TRIALS`` to fit it on."""
        scored = [(c, s) for c, s in self.history if s is not None]
        if len(scored) < self.SURROGATE_MIN_TRIALS:
            return None
        from bigopt.search.surrogate import DensityRatio

        return DensityRatio(self.space).fit([c for c, _ in scored], [s for _, s in scored])

    def _choose(self, options: list[Any], config_of: Callable[[Any], dict[str, Any]],
                density: Any = None) -> Any:
        """Of the ``candidates`` options drawn for one suggestion, the one whose config
        ``density`` (default: ``_density()``) ranks first; the first option while there are
        too few trials to fit it."""
        if len(options) == 1:
            return options[0]
        density = density or self._density()
        if density is None:
            return options[0]
        return options[int(np.argmax(density.score([config_of(o) for o in options])))]

    def score(self, result: dict[str, Any] | None) -> float | None:
        """The metric oriented so that larger is better, or None for a failed trial."""
        if not result or self.metric not in result or result[self.metric] is None:
            return None
        value = float(result[self.metric])
        return value if self.mode == "max" else -value

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        config = self.live.pop(trial_id, None)
        if config is None:
            return
        config = self._stripped(trial_id, config)
        if trial_id in self.reevaluating:
            self.reevaluating.remove(trial_id)
        self.history.append((config, None if error else self.score(result)))

    def adopt(self, trial_id: str, config: dict[str, Any]) -> None:
        """Record ``config`` as what running trial ``trial_id`` trains: on a resume whose saved
        state was behind, the replayed draw may differ from the config the trial really got."""
        if trial_id in self.live:
            self.live[trial_id] = self.space.flat(config) if self.space else dict(config)

    STATE = ("seed", "max_trials", "live", "history", "suggested")

    def get_state(self) -> dict[str, Any]:
        """Everything that decides the next suggestions, as JSON (restore into a searcher built
        with the same arguments; a space the Tuner gave is in it, one given to the constructor
        is the constructor's)."""
        state = {k: getattr(self, k) for k in self.STATE}
        state["rng"] = self.rng.bit_generator.state
        # a space the Tuner gave is saved too: Tuner.restore does not give it again
        state["space"] = self.space.to_json() if self.space is not None else None
        state["metric"], state["mode"] = self._metric, self._mode
        state["reevaluating"] = self.reevaluating
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        if self.space is None and state.get("space"):
            self._set_space(Space.from_json(state["space"]))
        self._metric = self._metric or state.get("metric")
        self._mode = self._mode or state.get("mode")
        for k in self.STATE:
            setattr(self, k, state[k])
        self.reevaluating = list(state.get("reevaluating", []))  # absent in older states
        self.history = [(config, score) for config, score in state["history"]]
        self.rng = np.random.default_rng(self.seed)
        self.rng.bit_generator.state = state["rng"]

    def save(self, checkpoint_path: str) -> None:
        # JSON, not pickle: a restore never executes what the file holds.
        tmp = checkpoint_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.get_state(), f)
        os.replace(tmp, checkpoint_path)  # atomic, as Tune's save_to_dir

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.set_state(json.load(f))


class RandomSearcher(_SeededSearcher):
    """Independent draws from the space: the baseline every searcher is compared with.
    ``dedupe=True`` draws again (up to ``MAX_REDRAWS`` times) a point already tried: random
    search without replacement, the fair baseline for the deduplicating searchers."""

    def __init__(self, space: dict[str, Any] | None = None, metric: str | None = None,
                 mode: str | None = None, *, seed: int = 0,
                 max_trials: int | None = None, dedupe: bool = False,
                 canonical: Callable[[dict[str, Any]], Any] | None = None):
        super().__init__(space, metric, mode, seed=seed, max_trials=max_trials)
        self.canonical = (canonical or (lambda config: config)) if dedupe else None

    def _next_config(self) -> dict[str, Any]:
        return self._unseen(self.space.sample(self.rng), lambda _: self.space.sample(self.rng))


class EvolutionSearcher(_SeededSearcher):
    """Regularized (aging) evolution (Real et al. 2019): a population of the newest
    ``population`` completed trials; each new trial mutates the best of ``tournament`` of them
    drawn at random, and the oldest member leaves as each new one joins. Until the population
    is full, trials are random draws.

    A child that was already tried is mutated again (up to ``MAX_REDRAWS`` times): re-training
    a known point spends a trial on nothing (measured on NAS-Bench-201, BENCHMARKS.md 5: it
    brings evolution level with TPE on CIFAR-100 and ImageNet16-120). ``canonical`` maps a
    config to the form that decides the trained model (for an architecture space,
    ``bigopt.search.arch.active``: decisions that do not shape the model nulled); default: the
    config itself. ``dedupe=False`` is the paper's algorithm, which may repeat points.

    ``candidates`` > 1: each suggestion breeds that many children (a tournament and a mutation
    each) and tries the one ``bigopt.search.surrogate.DensityRatio`` ranks first
    (surrogate-assisted evolution). 1: the paper's single child.

    ``guided``: the probability that a mutation draws its new value from the good trials'
    density l(x) (``DensityRatio.propose``, TPE's proposal) instead of uniformly; it pulls
    stray lineages towards what the best trials share (NAS-Bench-201, BENCHMARKS.md 5). 0: the
    paper's uniform mutation.

    ``crossover``: the probability that a child's parent is the uniform crossover of two
    tournament winners (each value from either, as a coin decides) rather than one winner; the
    mutation follows either way. ``fresh``: how many of the ``candidates`` are not children but
    whole points drawn from l(x) value by value (``DensityRatio.sample``, TPE's own proposal),
    ranked with the children: global moves beside the local ones.

    ``reevaluate``: the last that many trials of ``budget`` (default ``max_trials``) re-train
    the best challengers, each with a new seed under ``seed_key`` (``train.seed`` in bigopt's
    search stage) so that the second run is a second measurement (``_reevaluation``); the
    re-trained point joins the population again. 0: every trial a new point."""

    def __init__(self, space: dict[str, Any] | None = None, metric: str | None = None,
                 mode: str | None = None, *, seed: int = 0,
                 max_trials: int | None = None, population: int = 20, tournament: int = 5,
                 mutations: int = 1, canonical: Callable[[dict[str, Any]], Any] | None = None,
                 dedupe: bool = True, candidates: int = 1, guided: float = 0.0,
                 crossover: float = 0.0, fresh: int = 0, reevaluate: int = 0,
                 reevaluate_top: int = 2, seed_key: str | None = None, budget: int | None = None):
        super().__init__(space, metric, mode, seed=seed, max_trials=max_trials,
                         candidates=candidates, reevaluate=reevaluate,
                         reevaluate_top=reevaluate_top, seed_key=seed_key, budget=budget)
        self.canonical = (canonical or (lambda config: config)) if dedupe else None
        if not 0.0 <= guided <= 1.0:
            raise ValueError(f"guided: {guided} must be between 0 and 1")
        if not 0.0 <= crossover <= 1.0:
            raise ValueError(f"crossover: {crossover} must be between 0 and 1")
        if not 0 <= fresh < candidates:
            raise ValueError(f"fresh: {fresh} must be between 0 and candidates - 1 = {candidates - 1}")
        self.guided, self.crossover, self.fresh = guided, crossover, fresh
        if not 1 <= tournament <= population:
            raise ValueError(f"tournament: {tournament} must be between 1 and population={population}")
        self.population_size, self.tournament, self.mutations = population, tournament, mutations
        self.population: collections.deque[tuple[dict[str, Any], float]] = collections.deque(
            maxlen=population)

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "population": list(self.population)}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self.population = collections.deque(((c, s) for c, s in state["population"]),
                                            maxlen=self.population_size)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        known = trial_id in self.live
        super().on_trial_complete(trial_id, result, error)
        if known and self.history[-1][1] is not None:
            self.population.append(self.history[-1])  # the oldest member ages out

    def _next_config(self) -> dict[str, Any]:
        if len(self.population) < self.population_size:
            return self.space.sample(self.rng)
        # one fit per suggestion, shared by the guided mutations, the fresh draws and the ranking
        density = self._density() if self.guided > 0 or self.candidates > 1 else None
        guide = density if self.guided > 0 else None
        options = [self._child(guide) for _ in range(self.candidates - self.fresh)]
        if density is not None:  # none until SURROGATE_MIN_TRIALS have completed
            options += [self._unseen(density.sample(self.rng), lambda _: density.sample(self.rng))
                        for _ in range(self.fresh)]
        return self._choose(options, lambda c: c, density)

    def _winner(self) -> dict[str, Any]:
        picks = self.rng.choice(len(self.population), size=self.tournament, replace=False)
        return max((self.population[int(i)] for i in picks), key=lambda member: member[1])[0]

    def _child(self, density: Any = None) -> dict[str, Any]:
        parent = self._winner()
        if self.crossover > 0 and self.rng.random() < self.crossover:
            other = self._winner()
            parent = dict(parent)
            for dim in self.space.dims:
                if self.rng.random() >= 0.5:
                    parent[dim.path] = other[dim.path]
        return self._unseen(self._mutate(parent, density), lambda c: self._mutate(c, density))

    def _mutate(self, config: dict[str, Any], density: Any) -> dict[str, Any]:
        if density is not None and self.rng.random() < self.guided:
            return self.space.mutate(config, self.rng, n=self.mutations,
                                     propose=lambda dim, value: density.propose(dim, value, self.rng))
        return self.space.mutate(config, self.rng, n=self.mutations)


class SkipRepeats(Searcher):
    """Wraps a searcher that may suggest a point whose trial already completed (Optuna's TPE
    re-suggests ~15 % of its trials on NAS-Bench-201's categorical space): such a point is
    answered with that trial's result without training it again, and the wrapped searcher is
    asked for another, up to ``max_redraws`` times. A bigopt trial is deterministic (its seed is
    the spec's), so the repeat would have spent a whole trial to return the same number.

    The wrapped searcher sees every repeat as a trial of its own (``<trial_id>-repeat<k>``)
    completed with the earlier result, so its model is what it would have been; only the
    training is skipped. Points in flight are not answered (their result is not known yet).
    """

    def __init__(self, searcher: Searcher, *, canonical: Callable[[dict[str, Any]], Any] | None = None,
                 max_redraws: int = 50):
        self.searcher, self.max_redraws = searcher, max_redraws
        self.canonical = canonical or dict
        self.done: dict[str, dict[str, Any]] = {}  # point key -> the result its trial completed with
        self.live: dict[str, tuple[str, dict[str, Any]]] = {}  # trial id -> (inner id, config)
        self.skipped = 0
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def _key(self, config: dict[str, Any]) -> str:
        return point_key(config, self.canonical)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict[str, Any],
                              **spec: Any) -> bool:
        accepted = self.searcher.set_search_properties(metric, mode, config, **spec)
        if accepted:
            self._metric, self._mode = self.searcher.metric, self.searcher.mode
        return accepted

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        for attempt in range(self.max_redraws + 1):
            inner_id = trial_id if attempt == 0 else f"{trial_id}-repeat{attempt}"
            config = self.searcher.suggest(inner_id)
            if not isinstance(config, dict):  # None (wait) or Searcher.FINISHED
                return config
            earlier = self.done.get(self._key(config))
            if earlier is None or attempt == self.max_redraws:
                self.live[trial_id] = (inner_id, config)
                return config
            self.searcher.on_trial_complete(inner_id, result=dict(earlier))
            self.skipped += 1
        raise AssertionError("unreachable")

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self.live:
            self.searcher.on_trial_result(self.live[trial_id][0], result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if trial_id not in self.live:
            return
        inner_id, config = self.live.pop(trial_id)
        self.searcher.on_trial_complete(inner_id, result=result, error=error)
        if not error and result is not None and result.get(self.metric) is not None:
            self.done.setdefault(self._key(config), dict(result))

    def save(self, checkpoint_path: str) -> None:
        """One file, as Tune's ``save_to_dir`` expects (it renames the file it passes): this
        wrapper's state as JSON with the wrapped searcher's own file inside it."""
        import base64

        inner_path = checkpoint_path + ".inner"
        self.searcher.save(inner_path)
        with open(inner_path, "rb") as f:
            inner = base64.b64encode(f.read()).decode()
        os.remove(inner_path)
        with open(checkpoint_path, "w") as f:
            json.dump({"done": self.done, "live": self.live, "skipped": self.skipped,
                       "inner": inner}, f, default=str)

    def restore(self, checkpoint_path: str) -> None:
        import base64

        with open(checkpoint_path) as f:
            state = json.load(f)
        inner_path = checkpoint_path + ".inner"
        with open(inner_path, "wb") as f:  # written by save() above, in this run's own state
            f.write(base64.b64decode(state["inner"]))
        try:
            self.searcher.restore(inner_path)
        finally:
            os.remove(inner_path)
        self.done, self.skipped = state["done"], state["skipped"]
        self.live = {k: (v[0], v[1]) for k, v in state["live"].items()}
