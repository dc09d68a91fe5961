"""Run by test_multinode.py in a fresh interpreter: a 2-node Ray cluster on this host, one
bigopt training run spread over both nodes, and a JSON report of where each worker ran.

A separate process because ``ray.cluster_utils.Cluster`` must own the process's Ray
connection, and a pytest process may already hold the session Ray from tests/conftest.py.
The caller sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (loopback), RAY_TMPDIR (a private temp
dir) and RAY_AUTH_MODE=token before this interpreter imports ray.

usage: python multinode_run.py SPEC STORAGE OUT_JSON [--set a.b=c ...]
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from factories import free_port  # noqa: E402


def main(spec_path: str, storage: str, out_path: str, overrides: list[str]) -> None:
    import logging

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    import bigopt

    logging.basicConfig(level=logging.INFO, format="%(asctime)s bigopt %(message)s")
    started = time.time()
    # Two "nodes": each gets 2 CPU slots, one for its training worker (STRICT_SPREAD puts
    # exactly one per node) and one spare for the Ray Data read tasks that feed it. With
    # 1 CPU per node the workers would take every slot and the input pipeline would starve.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port(),
    })
    report: dict = {}
    try:
        cluster.add_node(num_cpus=2, dashboard_agent_listen_port=free_port())
        cluster.wait_for_nodes()
        cluster.connect()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        report["nodes"] = nodes
        report["cluster_up_s"] = round(time.time() - started, 1)
        spec = bigopt.load_spec(spec_path, ["storage=" + storage, *overrides])
        result = bigopt.run(spec)
        report["run_uri"] = result.run_uri
        report["run_s"] = round(result.seconds, 1)
        workers = list_actors(address=cluster.address,
                              filters=[("class_name", "=", "RayTrainWorker")], limit=1000,
                              raise_on_missing_output=False)
        report["workers"] = [{"node_id": a.node_id, "pid": a.pid, "state": a.state}
                             for a in workers]
    finally:
        ray.shutdown()
        cluster.shutdown()
        report["total_s"] = round(time.time() - started, 1)
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    spec_path, storage, out_path, *rest = sys.argv[1:]
    overrides = [rest[i + 1] for i in range(len(rest) - 1) if rest[i] == "--set"]
    main(spec_path, storage, out_path, overrides)
