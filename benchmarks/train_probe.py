"""What benchmarks/train.py measures inside bigopt's Ray Train workers (no change to bigopt).

``worker_setup`` is installed as Ray's ``worker_process_setup_hook``. In each worker it pins
Ray's address and, when ``bigopt.train.loop`` is imported, wraps three of its functions to add
to every ``metrics.jsonl`` row: the process's CPU seconds spent in ``train_step``, the row's
wall-clock time, the RSS before the model is built, and (from step 2 on) the bytes of model
state this rank holds, by role. train.py ships this module to the workers by value
(``ray.cloudpickle.register_pickle_by_value``), so workers need not find it on their path.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def _resident_bytes(ptr: int, nbytes: int) -> int:
    """Bytes of [ptr, ptr + nbytes) in RAM now (mincore), which is what RSS counts.

    torch.empty() of a large CPU buffer maps pages that only count once written: DeepSpeed's
    ZeRO reduce buckets (500M elements by default) are mostly never touched on a small model.
    """
    import ctypes

    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    start = ptr - ptr % page
    length = ptr + nbytes - start
    vec = (ctypes.c_ubyte * ((length + page - 1) // page))()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) != 0:
        return nbytes
    resident = int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * page
    return min(nbytes, resident)


def model_states(engine: Any, inner: Any) -> dict[str, float]:
    """Bytes of the tensors this rank holds, by role, de-duplicated by storage (MB).

    Taken inside the optimizer's step, so gradients are alive. params: the module's
    parameters (ZeRO-3's ``ds_tensor`` partitions included). master / opt_state: the params
    and state of ``inner``, the innermost torch optimizer (DeepSpeed's ZeRO and bf16 wrappers
    keep the fp32 master partitions there). grads: ``.grad`` of either. other: every other live
    tensor the garbage collector can see: ZeRO's flat gradient partitions and communication
    buckets, cached batches. Each is counted twice: allocated (storage size) and resident
    (pages in RAM, what RSS sees; on a GPU the two are the same).
    """
    import gc
    import warnings

    import torch

    seen: set[tuple[str, int]] = set()
    alloc: dict[str, int] = {}
    resident: dict[str, int] = {}

    def add(role: str, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = (str(t.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            return
        seen.add(key)
        n = storage.nbytes()
        alloc[role] = alloc.get(role, 0) + n
        on_cpu = t.device.type == "cpu"
        resident[role] = resident.get(role, 0) + (
            _resident_bytes(storage.data_ptr(), n) if on_cpu else n)

    module_params = list(engine.module.parameters())
    master = list(inner.state.keys()) + [p for g in inner.param_groups for p in g["params"]]
    for p in module_params:
        add("params", p)
        add("params", getattr(p, "ds_tensor", None))
    for p in master:
        add("master", p)
    for state in inner.state.values():
        for v in state.values():
            add("opt_state", v)
    for p in module_params + master:
        add("grads", p.grad)
    with warnings.catch_warnings():  # isinstance() on deprecated torch aliases warns
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor):
                add("other", o)
    roles = ("params", "master", "opt_state", "grads", "other")
    out = {f"ms_{r}_mb": resident.get(r, 0) / 2**20 for r in roles}
    out["ms_total_mb"] = sum(resident.values()) / 2**20
    out["ms_allocated_mb"] = sum(alloc.values()) / 2**20
    out["psi_local"] = float(sum(getattr(p, "ds_numel", p.numel()) for p in module_params))
    out["rss_at_step2_mb"] = _proc_status_mb("VmRSS")
    return out


def _innermost_optimizer(engine: Any) -> Any:
    import torch

    inner = getattr(engine, "optimizer", None)
    while inner is not None and not isinstance(inner, torch.optim.Optimizer):
        inner = getattr(inner, "optimizer", None)
    return inner


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _patch_loop(loop: Any) -> None:
    """Wrap two functions of bigopt.train.loop in this worker (the module itself is unchanged).

    * ``build_model``: record the process RSS just before the model is built (with
      DeepSpeed already imported), the runtime's own footprint: Python, torch, Ray, gloo.
    * ``Trainer.train_step``: also count the process's CPU seconds (``cpu_total_s``).
    * ``Trainer.memory_stats``: after step 1, wrap the innermost optimizer's ``step`` once, so
      that its first call in step 2 (Adam's states exist, gradients are alive) counts the model
      states; the counts ride along in every later row (only log points are written).
    """
    build, memory_stats = loop.build_model, loop.Trainer.memory_stats
    train_step = loop.Trainer.train_step
    probe: dict[str, float] = {"cpu_total_s": 0.0, "cpu_steps": 0}

    def cpu_timed_train_step(self: Any) -> Any:
        # CPU seconds of this process per step: unlike wall time, barely moved by other
        # engineers' jobs on the same cores. Cumulative; the driver takes window differences.
        start = time.process_time()
        out = train_step(self)
        probe["cpu_total_s"] += time.process_time() - start
        probe["cpu_steps"] += 1
        return out

    def build_model(job: Any) -> Any:
        if job.deepspeed_config is not None:
            import deepspeed  # noqa: F401  (the loop imports it right after; count it as runtime)
        probe["rss_before_model_mb"] = _proc_status_mb("VmRSS")
        return build(job)

    def wrap_step(engine: Any) -> None:
        inner = _innermost_optimizer(engine)
        if inner is None:
            return
        original = inner.step

        def step(*args: Any, **kwargs: Any) -> Any:
            inner.step = original  # once
            probe.update(model_states(engine, inner))
            return original(*args, **kwargs)

        inner.step = step

    def probed_memory_stats(self: Any) -> dict[str, float]:
        stats = memory_stats(self)
        stats["unix_time"] = time.time()  # window ends, to pair with the plain loop's steps
        if self.step == 1:
            probe["rss_after_step1_mb"] = _proc_status_mb("VmRSS")
            wrap_step(self.engine)
        stats.update(probe)
        return stats

    loop.build_model = build_model
    loop.Trainer.memory_stats = probed_memory_stats
    loop.Trainer.train_step = cpu_timed_train_step


def _pin_ray_address() -> None:
    """Point this Ray worker's address lookups at its own cluster.

    Ray Train's PlacementGroupCleaner asks the State API whether the controller lives with
    no address; with several Ray instances on one host (other engineers' tests) it resolved
    to another cluster, was told "no such actor", and removed this run's placement group,
    killing a healthy run. With RAY_ADDRESS set, the lookup stays on this cluster (which has
    no dashboard, so the cleaner's monitor thread stops instead: harmless here).
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def worker_setup() -> None:
    """Ray ``worker_process_setup_hook``: pin the address; patch bigopt.train.loop on import.

    A meta-path finder wraps only that module's loading, so Ray Data's workers do not pay for
    importing torch. This is the hook bigopt lacks; see BENCHMARKS.md.
    """
    import importlib.abc
    import importlib.util

    _pin_ray_address()

    class Finder(importlib.abc.MetaPathFinder):
        busy = False

        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name != "bigopt.train.loop" or self.busy:
                return None
            self.busy = True
            try:
                spec = importlib.util.find_spec(name)
            finally:
                self.busy = False
            exec_module = spec.loader.exec_module

            def exec_and_patch(module: Any) -> None:
                exec_module(module)
                _patch_loop(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, Finder())
