"""DeepSpeed ops: a build lock left by a killed builder is cleared, not waited on forever."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bigopt.train.ops import clear_stale_lock, lock_path, needed_ops, wait_for_lock


def test_only_offload_needs_an_op_and_shm_comm_is_never_built():
    assert needed_ops(None) == [] and needed_ops({"zero_optimization": {"stage": 3}}) == []
    ops = needed_ops({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    assert [op.name for op in ops] == ["cpu_adam"]


def test_skipping_shm_comm_makes_deepspeed_fall_back_to_torch_distributed():
    """What init_distributed does with the switch set: DeepSpeed's own build_shm_op returns
    None instead of compiling (its TorchBackend then runs every collective on gloo)."""
    import deepspeed
    from deepspeed.comm.torch import build_shm_op

    from bigopt.train.ops import skip_unused_ops

    skip_unused_ops()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert build_shm_op() is None


def test_a_stale_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = lock_path("some_op")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()
    assert not clear_stale_lock("some_op") and os.path.exists(path)  # a live build's lock
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert clear_stale_lock("some_op") and not os.path.exists(path)
    assert not clear_stale_lock("some_op")  # no lock: nothing to do


def test_waiting_breaks_a_lock_that_outlives_its_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = lock_path("some_op")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()
    started = time.time()
    wait_for_lock("some_op", stale_after_s=1.5, poll_s=0.1)  # its builder never releases it
    assert 1.5 <= time.time() - started < 10 and not os.path.exists(path)


@pytest.mark.slow
def test_cpu_adam_loads_despite_a_lock_left_by_a_killed_build():
    """The real op in the real build directory (built here if it is not yet): a lock file an
    hour old would make torch's loader wait forever; prepare_ops clears it and loads the op.
    Run in a subprocess so a regression fails on the timeout instead of hanging the suite."""
    path = lock_path("cpu_adam")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()
    old = time.time() - 3600
    os.utime(path, (old, old))
    code = ("from bigopt.train.ops import prepare_ops; print(prepare_ops("
            "{'zero_optimization': {'offload_optimizer': {'device': 'cpu'}}}))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    finally:
        if os.path.exists(path) and time.time() - os.stat(path).st_mtime > 1800:
            os.remove(path)  # never leave the planted lock behind for the rest of the suite
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'cpu_adam']" in out.stdout and not os.path.exists(path)
