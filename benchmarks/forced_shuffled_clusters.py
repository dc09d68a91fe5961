"""1M rows with near_dedup's verification and clusters forced onto the shuffled path (what 10M
takes over the 256 MiB rule): does the driver's growth follow the shuffles or the rows?

    python benchmarks/forced_shuffled_clusters.py /tmp/bigopt-scaling/storage/scaling-1000000.yaml

(the spec that ``benchmarks/scaling.py`` writes for 1M rows; read the run's manifest after)."""
import sys

import bigopt.data.dedup as dedup
from bigopt.cli import main

_parts = {}
_orig = dedup._near_clusters


def near_clusters(ds, sigs, pairs, ctx, threshold, action, parts):
    _parts["n"] = parts
    return _orig(ds, sigs, pairs, ctx, threshold, action, parts)


def shuffled(sigs, pairs, key, threshold, action):
    return dedup._clusters_shuffled(sigs, pairs, key, threshold, _parts["n"])


dedup._near_clusters = near_clusters
dedup._clusters_in_task = shuffled
sys.exit(main(["data", sys.argv[1]]))
