"""A `ray start` cluster that died without `ray stop` leaves its address file behind:
`bigopt` must notice at once and start its embedded Ray, not retry the dead address."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from factories import free_port
from ray_helpers import REPO, VENV_BIN, processes_mentioning, ray_env, short_tmpdir

pytestmark = pytest.mark.slow


def test_stale_cluster_record_falls_back_to_embedded_ray_at_once(tmp_path):
    ray_tmp = short_tmpdir("bostale")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    os.makedirs(os.path.join(ray_tmp, "ray"))  # where Ray looks: $RAY_TMPDIR/ray/ray_current_cluster
    with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
        f.write(dead)
    started = time.time()
    proc = subprocess.run(
        [os.path.join(VENV_BIN, "bigopt"), "data", "jobs/digits_mlp.yaml",
         "--set", f"storage={tmp_path}"],
        cwd=REPO, env=ray_env(ray_tmp), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    try:
        assert proc.returncode == 0, log[-3000:]
        assert f"recorded at {dead}" in log and "stale" in log, log[-3000:]
        up = re.search(r"^\S+ (\d\d:\d\d:\d\d),\d+ bigopt started an embedded local Ray", log, re.M)
        assert up, log[-3000:]
        # from the process start to the embedded Ray being up: seconds, not minutes
        assert time.time() - started < 120
        first = re.search(r"^\S+ (\d\d:\d\d:\d\d),\d+ bigopt", log, re.M)
        to_s = lambda hms: sum(int(x) * m for x, m in zip(hms.split(":"), (3600, 60, 1), strict=True))  # noqa: E731
        assert to_s(up.group(1)) - to_s(first.group(1)) <= 20, log[:2000]
        assert list((tmp_path / "digits-mlp").glob("*/data/artifact.json"))
    finally:
        for pid in processes_mentioning(ray_tmp):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
