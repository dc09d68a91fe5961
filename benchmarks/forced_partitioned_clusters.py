"""1M rows with near_dedup's verification and clusters forced onto the over-the-rule path (what
10M takes: the hash join in Ray tasks, ``bigopt.data.pair_join``): its time and the driver's
peak at a size where the in-task path is the default.

    python benchmarks/forced_partitioned_clusters.py /tmp/bigopt-scaling/storage/scaling-1000000.yaml

(the spec that ``benchmarks/scaling.py`` writes for 1M rows; read the run's manifest after).
Session 15 measured the path this one replaced (Ray Data cogroups and label propagation) with
the same forcing, from commit 7f1e298's ``benchmarks/forced_shuffled_clusters.py``."""
import sys

import bigopt.data.dedup as dedup
from bigopt.cli import main

_parts = {}
_orig = dedup._near_clusters


def near_clusters(ds, sigs, pairs, ctx, threshold, action, parts, num_perm):
    _parts["n"], _parts["num_perm"] = parts, num_perm
    return _orig(ds, sigs, pairs, ctx, threshold, action, parts, num_perm)


def partitioned(sigs, pairs, key, threshold, action):
    return dedup._clusters_partitioned(sigs, pairs, key, threshold, _parts["n"], _parts["num_perm"])


dedup._near_clusters = near_clusters
dedup._clusters_in_task = partitioned
sys.exit(main(["data", sys.argv[1]]))
