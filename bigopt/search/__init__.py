"""Search on Ray Tune: searchers as plain ``ray.tune.search.Searcher`` subclasses."""

from bigopt.search.rl import RLSearcher
from bigopt.search.searchers import EvolutionSearcher, RandomSearcher

__all__ = ["EvolutionSearcher", "RLSearcher", "RandomSearcher"]
