"""Session 20: seconds per 100-query RL (default) run on ImageNet16-120 in a warm process. Run
from the repository root once with each version of bigopt/search/rl.py to compare."""

import sys
import time

sys.path.insert(0, "benchmarks")
import search_nasbench as sn  # noqa: E402

sn._quiet()
table = sn.load_table("imagenet")
sn.run_one("rl-default", table, 1, 100)  # warm-up: imports
t0 = time.perf_counter()
for seed in range(30000, 30010):
    sn.run_one("rl-default", table, seed, 100)
print(f"{(time.perf_counter() - t0) / 10:.3f} s per 100-query run")
