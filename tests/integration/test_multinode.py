"""Training spread over two Ray nodes: `cluster.placement: STRICT_SPREAD` puts one worker on each.

The 2-node cluster (``ray.cluster_utils.Cluster``: two raylets on this host, loopback) runs in
a child interpreter, ``multinode_run.py``: the cluster must own that process's Ray
connection, and this pytest process may already hold the session Ray of tests/conftest.py.
Storage is a local path, which both "nodes" see because they share this host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from ray_helpers import (
    REPO,
    SHORT,
    check_run_artifacts,
    only_run_dir,
    processes_mentioning,
    ray_env,
    short_tmpdir,
)

pytestmark = pytest.mark.slow

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multinode_run.py")


def test_two_workers_on_two_nodes(tmp_path):
    ray_tmp = short_tmpdir("bomn")  # RAY_TMPDIR: sessions and sockets; short for AF_UNIX
    out = tmp_path / "out.json"
    storage = tmp_path / "runs"
    log = tmp_path / "multinode.log"
    cmd = [sys.executable, SCRIPT, "jobs/quickstart.yaml", str(storage), str(out),
           "--set", "cluster.placement=STRICT_SPREAD", *SHORT]
    with open(log, "w") as log_f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ray_env(ray_tmp), stdout=log_f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout (600 s)"
        finally:
            for pid in processes_mentioning(ray_tmp):  # ours only: they name our temp dir
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    tail = log.read_text()[-5000:]
    assert rc == 0, f"multinode_run.py: {rc}\n{tail}"
    report = json.loads(out.read_text())

    assert len(report["nodes"]) == 2, report
    workers = report["workers"]
    assert len(workers) == 2, report
    assert {w["node_id"] for w in workers} == set(report["nodes"]), (
        f"STRICT_SPREAD should put one training worker on each node: {report}")

    ckpt = check_run_artifacts(only_run_dir(storage, "quickstart"))
    # ZeRO-2 optimizer shards, one per rank: rank 0 and rank 1 each wrote theirs on its node.
    shards = sorted(p.name for p in ckpt.rglob("*zero_pp_rank_*optim_states.pt"))
    assert any("zero_pp_rank_0_" in s for s in shards), shards
    assert any("zero_pp_rank_1_" in s for s in shards), shards
    assert not processes_mentioning(ray_tmp), "processes of our 2-node cluster still running"
    shutil.rmtree(ray_tmp, ignore_errors=True)
