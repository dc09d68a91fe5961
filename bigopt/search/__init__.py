"""Search on Ray Tune: searchers as plain ``ray.tune.search.Searcher`` subclasses.

Imported lazily (``from bigopt.search import EvolutionSearcher`` imports Ray Tune then), so the
search section's spec (``bigopt.search.spec``) reads without torch or Ray.
"""

from typing import Any

__all__ = ["EvolutionSearcher", "RLSearcher", "RandomSearcher"]


def __getattr__(name: str) -> Any:
    if name == "RLSearcher":
        from bigopt.search.rl import RLSearcher

        return RLSearcher
    if name in ("EvolutionSearcher", "RandomSearcher"):
        from bigopt.search import searchers

        return getattr(searchers, name)
    raise AttributeError(f"module 'bigopt.search' has no attribute {name!r}")
