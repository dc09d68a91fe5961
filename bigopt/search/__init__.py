"""Search on Ray Tune: searchers as plain ``ray.tune.search.Searcher`` subclasses."""

from bigopt.search.searchers import EvolutionSearcher, RandomSearcher

__all__ = ["EvolutionSearcher", "RandomSearcher"]
