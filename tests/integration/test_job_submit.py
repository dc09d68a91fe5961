"""bigopt under `ray job submit`, as users run it on a cluster, against a head we start here.

The head is `ray start --head` on 127.0.0.1 with free ports, token auth on (RAY_AUTH_MODE=token,
token in ~/.ray/auth_token), started from this venv so a job's `bigopt` resolves to it.
`--working-dir` ships the checkout (minus .git/.venv/.gitignore'd paths); the job writes its
run directory to a tmp storage path that this test then reads.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from ray_helpers import (
    REPO,
    SHORT,
    VENV_BIN,
    RayHead,
    auth_headers,
    check_run_artifacts,
    only_run_dir,
    wait_job,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    # A full head: the 2 training workers take both CPUs, leaving none for Ray Data's read
    # tasks. The run must still make progress (bigopt reads its data before the workers start).
    h = RayHead(num_cpus=2)
    try:
        h.wait_ready()
        yield h
    finally:
        left = h.stop()
        assert not left, f"processes of our Ray head still running: {left}"


def submit_cli(head: RayHead, submission_id: str, *entrypoint: str, timeout: float = 600):
    """`ray job submit` exactly as a user types it; waits for the job and returns the result."""
    cmd = [os.path.join(VENV_BIN, "ray"), "job", "submit", "--address", head.dashboard_url,
           "--submission-id", submission_id, "--working-dir", str(REPO), "--", *entrypoint]
    return subprocess.run(cmd, env=head.env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_submit_quickstart(head, tmp_path):
    job_id = f"quickstart-{uuid.uuid4().hex[:8]}"
    r = submit_cli(head, job_id, "bigopt", "run", "jobs/quickstart.yaml",
                   "--set", f"storage={tmp_path}", *SHORT)
    client = head.client()
    status = client.get_job_status(job_id)
    assert r.returncode == 0 and status == "SUCCEEDED", (
        f"rc={r.returncode} status={status}\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}")
    ckpt = check_run_artifacts(only_run_dir(tmp_path, "quickstart"))
    # ZeRO-2: each of the 2 ranks wrote its optimizer shard into the one checkpoint.
    shards = sorted(p.name for p in ckpt.rglob("*zero_pp_rank_*optim_states.pt"))
    assert len(shards) == 2, shards

    # What --working-dir shipped: the code and specs, not .venv/, runs/ or .git/ (Ray skips
    # .git and .venv by default and honours .gitignore).
    pkgs = list(Path(head.tmp).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*/"))
    assert pkgs, "no unpacked working_dir package found on the head"
    for pkg in pkgs:
        top = {p.name for p in pkg.iterdir()}
        assert {"bigopt", "jobs"} <= top, top
        assert not top & {".venv", "runs", ".git"}, top
        size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
        assert size < 20 * 2**20, f"working_dir upload is {size / 2**20:.1f} MiB"


def test_sdk_submit_validate(head):
    client = head.client()
    job_id = client.submit_job(
        entrypoint="python -c 'import bigopt; print(\"bigopt from\", bigopt.__file__)' && "
                   "bigopt validate jobs/quickstart.yaml",
        runtime_env={"working_dir": str(REPO)})
    status = wait_job(client, job_id, timeout=180)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "jobs/quickstart.yaml: ok (stages: data, train)" in logs, logs[-3000:]
    # The shipped checkout is on the job's PYTHONPATH: its bigopt/ is the code that runs.
    assert "working_dir_files/_ray_pkg_" in logs, logs[-3000:]


def test_token_auth_enforced(head):
    def get(headers):
        req = urllib.request.Request(head.dashboard_url + "/api/jobs/", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert get({}) == 401
    assert get({"Authorization": "Bearer not-the-token"}) == 403
    assert get(auth_headers()) == 200


def test_failing_job_shows_legible_error(head):
    job_id = f"bad-zero-{uuid.uuid4().hex[:8]}"
    r = submit_cli(head, job_id, "bigopt", "run", "jobs/quickstart.yaml",
                   "--set", "train.zero.stage=7", timeout=300)
    client = head.client()
    assert client.get_job_status(job_id) == "FAILED"
    assert r.returncode != 0
    logs = client.get_job_logs(job_id)
    assert "train.zero.stage: Input should be 0, 1, 2 or 3" in logs, logs[-3000:]
    # the same line reaches the submitting terminal
    assert "train.zero.stage: Input should be 0, 1, 2 or 3" in r.stdout + r.stderr
