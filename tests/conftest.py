"""One Ray instance per test session, on loopback, shared by every test that needs Ray.

Subprocesses (``bigopt run`` through the CLI) join the same instance through RAY_ADDRESS.
Tests that need their own cluster (``ray start``, multi-node, autoscaling) start and stop
only what they started.
"""

from __future__ import annotations

import os

# Read when `ray` is first imported: keeps Ray on 127.0.0.1 instead of the eth0 address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Quieter, faster workers: no usage-stats prompt, no per-task progress bars in CI logs.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train waits 60 s for a worker group to start; four workers importing torch and
# DeepSpeed on a loaded 2-core CI machine can take longer (the hybrid 2x2 test).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")

import sys  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `factories` (the shared spec factory and free-port helper) and tests/integration's
# `ray_helpers` are plain modules; --import-mode=importlib puts no test dir on sys.path.
_HELPER_DIRS = (os.path.join(REPO, "tests"), os.path.join(REPO, "tests", "integration"))
for _dir in _HELPER_DIRS:
    if _dir not in sys.path:
        sys.path.insert(0, _dir)
# Ray workers unpickle a test's closures by importing the test module, which imports
# `factories`: they need the same dirs, and they inherit this environment from ray.init.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [*_HELPER_DIRS, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

from factories import free_port  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server process (moto_server) on 127.0.0.1, plus a bucket.

    Set BIGOPT_TEST_S3_ENDPOINT (and AWS credentials) to run the same tests against MinIO or
    real S3 instead. Started before Ray so Ray's workers inherit the endpoint variables.
    """
    import subprocess
    import time

    import boto3

    endpoint = os.environ.get("BIGOPT_TEST_S3_ENDPOINT")
    proc = None
    if not endpoint:
        port = free_port()
        # this interpreter's moto, not whichever `moto_server` comes first on PATH
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    os.environ.setdefault("AWS_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=endpoint)
    for _ in range(100):
        try:
            client.list_buckets()
            break
        except Exception:  # server still starting
            time.sleep(0.1)
    bucket = os.environ.get("BIGOPT_TEST_S3_BUCKET", "bigopt-test")
    if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """The session's embedded Ray: 3 CPU slots (2 training workers + 1 for Ray Data)."""
    import ray

    from bigopt.runtime import SPILL_CONFIG

    # the user's embedded Ray's spill setting (bigopt.runtime.connect_ray)
    ray.init(num_cpus=3, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
             _system_config=SPILL_CONFIG)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test (the machine is small and shared: faster and
    steadier timings); the previous count is put back."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def repo_root() -> str:
    return REPO


def pytest_collection_modifyitems(config, items):
    """Run tests/integration first: they start their own Ray clusters (`ray start`, a
    multi-node `Cluster`, the fake autoscaler) and need the machine before the session's
    embedded Ray exists; with both up, the `ray start` head's job agent never registered
    ("No available agent to submit job") in a full-suite run."""
    items.sort(key=lambda item: "/integration/" not in str(item.path))
