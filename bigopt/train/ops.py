"""DeepSpeed's C++ ops built once, and never waited on forever.

DeepSpeed compiles an op the first time an engine needs it, through torch's JIT extension
loader: CPU Adam for optimizer offload, and on CPU machines the shared-memory collectives
(``deepspeed_shm_comm``) in ``init_distributed``. bigopt does without the second
(:func:`skip_unused_ops`): DeepSpeed's ``TorchBackend`` uses it only in
``inference_all_reduce``; training's all-reduce, all-gather and reduce-scatter go through
``torch.distributed`` (gloo on CPU) whether it is built or not, and building it cost ~40 s of
a fresh machine's first run (issue 18: 74 s to the first step, 40 of them this build).

Every load, even of an op already built, takes a file lock (``<build dir>/lock``); a process
killed while it held the lock (a worker SIGKILLed while loading, a test run stopped mid-build)
leaves the file behind, and every later load on that machine then waits on it forever. A build
takes under a minute on 2 cores, so a lock older than ``STALE_LOCK_S`` belongs to no live
build: bigopt waits for a young lock, and removes an old one with a warning, before it lets
DeepSpeed load the op. For a job with optimizer offload the driver builds the ops before the
workers start, so the workers (on the driver's node) find CPU Adam built instead of racing to
build it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("bigopt")

#: a lock older than this belongs to no live build (cpu_adam builds in ~50 s on 2 cores)
STALE_LOCK_S = 300.0


#: ops DeepSpeed would build that training never calls (see the module docstring)
UNUSED_OPS = ("deepspeed_shm_comm",)


def skip_unused_ops() -> None:
    """Mark ``UNUSED_OPS`` unavailable, so ``deepspeed.init_distributed`` does not build them
    (the switch DeepSpeed's own compatibility probe sets on a platform without them; its
    ``ops`` module keeps that dict for edits like this). Call before ``init_distributed``."""
    import deepspeed

    for name in UNUSED_OPS:
        deepspeed.ops.__compatible_ops__[name] = False


def needed_ops(ds_config: dict[str, Any] | None) -> list[Any]:
    """The DeepSpeed op builders ``deepspeed.initialize`` loads for ``ds_config`` here (after
    :func:`skip_unused_ops`)."""
    builders = []
    zero = (ds_config or {}).get("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.op_builder import CPUAdamBuilder

        builders.append(CPUAdamBuilder())
    return builders


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


def wait_for_lock(op_name: str, stale_after_s: float = STALE_LOCK_S, poll_s: float = 0.5) -> None:
    """Return once ``op_name``'s build lock is gone: released by a live build, or removed here
    when it outlived ``stale_after_s``."""
    while os.path.exists(lock_path(op_name)):
        if clear_stale_lock(op_name, stale_after_s):
            return
        time.sleep(poll_s)


def prepare_ops(ds_config: dict[str, Any] | None) -> list[str]:
    """Build or load the ops ``ds_config`` needs, past any stale lock; their names."""
    names = []
    for builder in needed_ops(ds_config):
        wait_for_lock(builder.name)
        started = time.time()
        builder.load(verbose=False)
        log.info("DeepSpeed op %s ready in %.1f s", builder.name, time.time() - started)
        names.append(builder.name)
    return names
