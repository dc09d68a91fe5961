"""Autoscaling on one machine: clusters/local/fake_multinode.yaml scales out for a bigopt run.

The head advertises 0 CPUs (as on the clouds), so every Ray Data task and training worker of
the run needs a worker node; the fake_multinode provider starts them as extra raylets on this
host (max 2 x 1 CPU) and removes them after idle_timeout_minutes (0.2 min).

The run is submitted as a Ray job: its driver runs on the head, its Ray Data tasks and 2
training workers (0.5 CPU each) need the worker nodes, so the two 1-CPU nodes hold both workers
plus Ray Data's read tasks. No `working_dir`: bigopt is installed on this host already, and the
fake nodes share the head's session dir, so each joining node re-extracts a working_dir package
in place, deleting the cwd of processes already running in it (torch then cannot initialise
oneMKL: "Cannot load libtorch_cpu.so"). On a real cluster every node has its own disk.
test_job_submit.py covers `--working-dir`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import yaml

from ray_helpers import (
    REPO,
    SHORT,
    VENV_BIN,
    RayHead,
    check_run_artifacts,
    free_port,
    only_run_dir,
)

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 600
SCALE_DOWN_TIMEOUT_S = 180


def fake_cluster_config(tmp_path, gcs_port: int) -> str:
    """clusters/local/fake_multinode.yaml, plus the head's GCS address for the fake nodes.

    The provider starts each fake node with gcs_address=<this host's IP>:6379 unless
    provider.gcs_address says otherwise; our head listens on a free port, not 6379 (which may
    be another cluster on this machine, whose GCS the fake nodes would then join).
    """
    cfg = yaml.safe_load((REPO / "clusters/local/fake_multinode.yaml").read_text())
    cfg["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"
    path = tmp_path / "fake_multinode.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def alive_nodes(head: RayHead) -> list[dict]:
    """ALIVE nodes as `ray list nodes` reports them (the state API; needs the token)."""
    r = subprocess.run([os.path.join(VENV_BIN, "ray"), "list", "nodes", "--address",
                        head.gcs_address, "--format", "json", "--limit", "100"],
                       env=head.env, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"ray list nodes failed: {r.stderr[-1000:]}")
    return [n for n in json.loads(r.stdout) if n["state"] == "ALIVE"]


def still_there(head: RayHead, nodes: list[str]) -> str:
    """Actors alive and objects held on ``nodes`` (what keeps a node from being idle)."""
    out = []
    for kind in ("actors", "objects", "tasks"):
        r = subprocess.run([os.path.join(VENV_BIN, "ray"), "list", kind, "--address",
                            head.gcs_address, "--format", "json", "--limit", "200", "--detail"],
                           env=head.env, capture_output=True, text=True, timeout=60)
        try:
            rows = json.loads(r.stdout)
        except json.JSONDecodeError:
            out.append(f"{kind}: {r.stderr[-300:]}")
            continue
        here = [row for row in rows if row.get("node_id") in nodes
                and row.get("state") not in ("DEAD", "FINISHED", "FAILED")]
        out.append(f"{kind}: " + "; ".join(
            str({k: row.get(k) for k in ("class_name", "name", "func_or_class_name", "state",
                                          "reference_type", "call_site", "object_size")
                 if row.get(k) is not None}) for row in here[:10]))
    return " | ".join(out)


def worker_nodes(nodes: list[dict]) -> list[str]:
    return sorted(n["node_id"] for n in nodes if not n.get("is_head_node"))


@pytest.fixture
def fake_head(tmp_path):
    gcs_port = free_port()
    config = fake_cluster_config(tmp_path, gcs_port)
    h = RayHead(num_cpus=0, gcs_port=gcs_port, prefix="boas",
                extra_args=["--autoscaling-config", config],
                env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    try:
        h.wait_ready()
        yield h
    finally:
        # The fake worker nodes are raylets the autoscaler (a child of `ray start`) launched:
        # in our process group and named after our temp dir, so stop() ends them too.
        left = h.stop()
        assert not left, f"processes of our fake cluster still running: {left}"


def test_scale_up_run_scale_down(fake_head, tmp_path):
    head = fake_head
    assert worker_nodes(alive_nodes(head)) == [], "a fresh fake cluster should be the head alone"

    storage = tmp_path / "runs"
    entrypoint = " ".join(["bigopt", "run", str(REPO / "jobs/quickstart.yaml"), "--set",
                           f"storage={storage}", "--set", "cluster.cpus_per_worker=0.5", *SHORT])
    client = head.client()
    job_id = client.submit_job(entrypoint=entrypoint)
    seen: set[str] = set()
    most_at_once = 0
    started = time.time()
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.time() - started > RUN_TIMEOUT_S:
            client.stop_job(job_id)
            pytest.fail(f"job not done after {RUN_TIMEOUT_S} s; worker nodes seen: {len(seen)}\n"
                        + client.get_job_logs(job_id)[-4000:])
        try:
            workers = worker_nodes(alive_nodes(head))
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError):
            workers = []
        seen.update(workers)
        most_at_once = max(most_at_once, len(workers))
        time.sleep(3)
    run_s = time.time() - started
    assert str(status.value) == "SUCCEEDED", f"job {status}:\n{client.get_job_logs(job_id)[-5000:]}"
    assert most_at_once >= 1, "the autoscaler never added a worker node"
    assert most_at_once <= 2, f"{most_at_once} worker nodes: max_workers is 2"
    check_run_artifacts(only_run_dir(storage, "quickstart"))

    # Idle workers go after idle_timeout_minutes (0.2 min) plus an autoscaler round or two.
    ended = time.time()
    deadline = ended + SCALE_DOWN_TIMEOUT_S
    workers = worker_nodes(alive_nodes(head))
    while workers and time.time() < deadline:
        time.sleep(3)
        workers = worker_nodes(alive_nodes(head))
    assert not workers, (f"still {len(workers)} worker node(s) {SCALE_DOWN_TIMEOUT_S} s after "
                         "the run ended; expected scale-down to the head alone; what is still "
                         f"there: {still_there(head, workers)}")
    print(f"autoscale: {len(seen)} worker node(s) started, at most {most_at_once} at once; "
          f"run {run_s:.0f} s; back to the head alone {time.time() - ended:.0f} s after")
