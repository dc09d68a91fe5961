"""Tune search spaces as something a searcher can sample and mutate with its own seeded RNG.

Tune's domains (``tune.choice``, ``randint``, ``uniform``, ``loguniform``, ``quniform``, ...)
sample with NumPy's global state; a searcher that must give the same suggestions for the same
seed draws from its own ``numpy.random.Generator`` instead. ``Space`` flattens a (nested)
param space into dotted paths (``{"train": {"lr": ...}}`` -> ``"train.lr"``, the keys
``bigopt.train.trial.tune_trainable`` applies to a spec) and raises on anything it cannot
express (grid search, sample_from), as Tune's own translators do. Searchers reason about the
flat form and hand Tune the space's own shape back (``Space.nest``), as Tune's searchers do:
``{"train_loop_config": {"lr": ...}}`` suggests ``{"train_loop_config": {"lr": 0.01}}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.tune.search.sample import (
    Categorical,
    Domain,
    Float,
    Integer,
    LogUniform,
    Quantized,
    Uniform,
)


def _inner(sampler: Any) -> Any:
    return sampler.sampler if isinstance(sampler, Quantized) else sampler


@dataclass(frozen=True)
class Dim:
    """One searchable value: a categorical choice, or an integer/float range."""

    path: str
    domain: Domain

    def sample(self, rng: np.random.Generator) -> Any:
        d = self.domain
        if isinstance(d, Categorical):
            return d.categories[int(rng.integers(len(d.categories)))]
        if isinstance(d, Integer):
            return self._quantize(int(rng.integers(d.lower, d.upper)))
        lo, hi = self._bounds()
        return self._quantize(self._from_unit(rng.uniform(lo, hi)))

    def mutate(self, value: Any, rng: np.random.Generator, scale: float = 0.2) -> Any:
        """A nearby value: another category, or a Gaussian step of ``scale`` x the range (in log
        space for log-uniform domains), clipped and quantized."""
        d = self.domain
        if isinstance(d, Categorical):
            others = [c for c in d.categories if c != value] or list(d.categories)
            return others[int(rng.integers(len(others)))]
        if isinstance(d, Integer):
            step = max(1, round(rng.normal(0, scale * (d.upper - 1 - d.lower))))
            moved = int(value) + int(step if rng.random() < 0.5 else -step)
            return self._quantize(min(max(moved, d.lower), d.upper - 1))
        lo, hi = self._bounds()
        unit = self._to_unit(float(value)) + rng.normal(0, scale * (hi - lo))
        return self._quantize(self._from_unit(min(max(unit, lo), hi)))

    def _log(self) -> bool:
        sampler = self.domain.get_sampler()
        inner = sampler.sampler if isinstance(sampler, Quantized) else sampler
        return isinstance(inner, LogUniform)

    def _bounds(self) -> tuple[float, float]:
        d = self.domain
        return (math.log(d.lower), math.log(d.upper)) if self._log() else (d.lower, d.upper)

    def _to_unit(self, x: float) -> float:
        return math.log(x) if self._log() else x

    def _from_unit(self, u: float) -> float:
        return math.exp(u) if self._log() else u

    def _quantize(self, x: Any) -> Any:
        sampler = self.domain.get_sampler()
        if not isinstance(sampler, Quantized):
            return x
        q = sampler.q
        value = round(x / q) * q
        return int(value) if isinstance(self.domain, Integer) else float(value)


class Space:
    """A flat list of ``Dim``s from a nested Tune param space; constants pass through."""

    def __init__(self, param_space: dict[str, Any]):
        self.dims: list[Dim] = []
        self.constants: dict[str, Any] = {}
        #: flat path -> the keys that reach it in the param space (``("train", "lr")``)
        self.keys: dict[str, tuple[str, ...]] = {}
        self._flatten(param_space, ())
        if not self.dims:
            raise ValueError("search space: no tune domain (tune.choice, tune.uniform, ...) in it")
        self.nested = any(len(keys) > 1 for keys in self.keys.values())

    def _flatten(self, node: dict[str, Any], parents: tuple[str, ...]) -> None:
        for key, value in node.items():
            keys = (*parents, str(key))
            path = ".".join(keys)
            if isinstance(value, dict) and "grid_search" in value:
                raise ValueError(f"{path}: grid_search cannot be searched by a sampling searcher")
            if isinstance(value, dict) and value:
                self._flatten(value, keys)
                continue
            if path in self.keys:  # {"a.b": ..} beside {"a": {"b": ..}}
                raise ValueError(f"{path}: named twice in the search space")
            self.keys[path] = keys
            if isinstance(value, (Integer, Float)) and not isinstance(
                    _inner(value.get_sampler()), (Uniform, LogUniform)):
                raise ValueError(f"{path}: {type(_inner(value.get_sampler())).__name__} sampling "
                                 "is not supported; use uniform / loguniform / their q- forms")
            if isinstance(value, (Categorical, Integer, Float)):
                self.dims.append(Dim(path, value))
            elif isinstance(value, Domain):
                raise ValueError(f"{path}: {type(value).__name__} domains are not supported; use "
                                 "tune.choice / randint / uniform / loguniform / quniform")
            else:
                self.constants[path] = value

    def nest(self, config: dict[str, Any]) -> dict[str, Any]:
        """A flat config in the param space's own shape (keys the space does not hold, such
        as a re-evaluation's seed, stay at the top level)."""
        if not self.nested:
            return dict(config)
        out: dict[str, Any] = {}
        for path, value in config.items():
            *parents, last = self.keys.get(path, (path,))
            node = out
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value
        return out

    def flat(self, config: dict[str, Any]) -> dict[str, Any]:
        """``nest``'s inverse: a config as Tune hands it back (``adopt``, a restored trial)."""
        if not self.nested:
            return dict(config)
        out: dict[str, Any] = {}
        claimed: set[str] = set()
        for path, keys in self.keys.items():
            node: Any = config
            for key in keys:
                if not isinstance(node, dict) or key not in node:
                    break
                node = node[key]
            else:
                out[path] = node
                claimed.add(keys[0])
        out.update({k: v for k, v in config.items() if k not in claimed})
        return out

    def to_json(self) -> dict[str, Any] | None:
        """The space as JSON, for a searcher's saved state (Tune's ``Tuner.restore`` does not
        pass the param space again, and the state is never pickled); None when a value would
        not come back the same (a category that is a tuple or an object)."""
        entries: list[dict[str, Any]] = []
        dims = {d.path: d.domain for d in self.dims}
        for path, keys in self.keys.items():
            entry: dict[str, Any] = {"keys": list(keys)}
            if path in self.constants:
                entry["value"] = self.constants[path]
            elif isinstance(dims[path], Categorical):
                entry["choice"] = list(dims[path].categories)
            else:
                d = dims[path]
                sampler = d.get_sampler()
                entry.update(kind="int" if isinstance(d, Integer) else "float", lower=d.lower,
                             upper=d.upper, log=isinstance(_inner(sampler), LogUniform),
                             q=sampler.q if isinstance(sampler, Quantized) else None)
            entries.append(entry)
        try:
            text = json.dumps(entries)
        except (TypeError, ValueError):
            return None
        return {"entries": entries} if json.loads(text) == entries else None

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> Space:
        root: dict[str, Any] = {}
        for entry in state["entries"]:
            *parents, last = entry["keys"]
            node = root
            for key in parents:
                node = node.setdefault(key, {})
            if "value" in entry:
                node[last] = entry["value"]
            elif "choice" in entry:
                node[last] = Categorical(entry["choice"]).uniform()
            else:
                domain = (Integer if entry["kind"] == "int" else Float)(entry["lower"], entry["upper"])
                domain = domain.loguniform() if entry["log"] else domain.uniform()
                node[last] = domain.quantized(entry["q"]) if entry["q"] is not None else domain
        return cls(root)

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        return {**self.constants, **{d.path: d.sample(rng) for d in self.dims}}

    def mutate(self, config: dict[str, Any], rng: np.random.Generator, *, n: int = 1,
               propose: Callable[[Dim, Any], Any] | None = None) -> dict[str, Any]:
        """``config`` with ``n`` of its searchable values changed: each by ``propose(dim,
        value)`` when given (a guided mutation), else by ``Dim.mutate``."""
        child = dict(config)
        for i in rng.choice(len(self.dims), size=min(n, len(self.dims)), replace=False):
            dim = self.dims[int(i)]
            child[dim.path] = (propose(dim, config[dim.path]) if propose is not None
                               else dim.mutate(config[dim.path], rng))
        return child

