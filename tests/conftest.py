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

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ray_session():
    """The session's embedded Ray: 3 CPU slots (2 training workers + 1 for Ray Data)."""
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=True)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


@pytest.fixture
def repo_root() -> str:
    return REPO
