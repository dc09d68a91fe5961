"""DeepSpeed's C++ ops (CPU Adam for optimizer offload) built once, and never waited on forever.

DeepSpeed compiles an op the first time an engine needs it, through torch's JIT extension
loader. Every load, even of an op already built, takes a file lock (``<build dir>/lock``); a
process killed while it held the lock (a worker SIGKILLed mid-build, a test run stopped) leaves
the file behind, and every later load on that machine then waits on it forever. A build takes
about a minute on 2 cores, so a lock far older than that belongs to no live build: it is
removed, with a warning. The driver builds the ops a job needs before the workers start, so the
workers (on the driver's node) find them built instead of racing to build them.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("bigopt")

#: a lock older than this belongs to no live build (a cpu_adam build: ~50 s on 2 cores)
STALE_LOCK_S = 900.0


def needed_ops(ds_config: dict[str, Any] | None) -> list[Any]:
    """The DeepSpeed op builders a DeepSpeed config loads at ``deepspeed.initialize``."""
    zero = (ds_config or {}).get("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.op_builder import CPUAdamBuilder

        return [CPUAdamBuilder()]
    return []


def lock_path(op_name: str) -> str:
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.join(_get_build_directory(op_name, verbose=False), "lock")


def clear_stale_lock(op_name: str, stale_after_s: float = STALE_LOCK_S) -> bool:
    """Remove ``op_name``'s build lock when it is older than ``stale_after_s``; True if removed."""
    path = lock_path(op_name)
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return False
    if age < stale_after_s:
        return False
    log.warning("removing a stale DeepSpeed build lock %s (%.0f s old: its builder died)", path, age)
    try:
        os.remove(path)
    except FileNotFoundError:  # another process removed it first
        pass
    return True


def prepare_ops(ds_config: dict[str, Any] | None) -> list[str]:
    """Clear stale locks of, then build or load, the ops ``ds_config`` needs; their names."""
    names = []
    for builder in needed_ops(ds_config):
        clear_stale_lock(builder.name)
        started = time.time()
        builder.load(verbose=False)
        log.info("DeepSpeed op %s ready in %.1f s", builder.name, time.time() - started)
        names.append(builder.name)
    return names
