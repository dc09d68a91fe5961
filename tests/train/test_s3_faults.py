"""Training with checkpoints on a real S3-protocol server (moto_server on 127.0.0.1, or the
endpoint in BIGOPT_TEST_S3_ENDPOINT; the faults need a plain-HTTP one) when things break: the
store restarting while a checkpoint uploads, the run killed for good mid-upload, a training
worker SIGKILLed. A ``TrippingProxy`` in front of the server times the faults to the bytes of
a checkpoint's upload.

Ray's storage filesystem is pickled from the driver, so Ray's checkpoint uploads go through
the driver's endpoint (the proxy here); the workers' own writes (metrics, completion markers)
use theirs (the server itself): the faults hit the uploads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from bigopt.runtime import RunDir
from bigopt.train.layout import COMPLETE_FILE, latest_checkpoint

from factories import TINY, TrippingProxy, merge, s3_objects, spec_dict

pytestmark = pytest.mark.slow

#: the store's outage: longer than the AWS SDK's default 3 tries wait (under 3 s)
OUTAGE_S = 6.0
#: a tiny run with checkpoints at steps 2, 4 and 6; spec defaults otherwise (precision auto:
#: bf16 on CPU; failure handling: restarts allowed since it checkpoints)
SMALL = merge(TINY, {"model": {"n_layer": 1},
                     "train": {"max_steps": 6, "checkpoint_every": 2, "eval_batches": 1}})


@pytest.fixture
def proxy():
    server = urlparse(os.environ["AWS_ENDPOINT_URL"])
    proxy = TrippingProxy((server.hostname, server.port))
    yield proxy
    proxy.stop()


def checkpoints(run_uri: str) -> dict[str, list[str]]:
    """``step_NNNNNN`` -> the names of its objects on the server (the store's own listing)."""
    found: dict[str, list[str]] = {}
    for key in s3_objects(f"{run_uri}/train/checkpoints"):
        step, _, name = key.partition("/")
        if step.startswith("step_") and name:
            found.setdefault(step, []).append(name)
    return found


def run_id(keys: list[str]) -> str:
    """The one run id among keys under ``<storage>/<name>/``."""
    found = {k.split("/")[0] for k in keys if k.endswith("/spec.yaml")}
    assert len(found) == 1, keys
    return found.pop()


def assert_whole(files: list[str]) -> None:
    """Both ranks' RNG states, the engine's model and optimizer states, the trainer's state,
    and the marker that says they are all there."""
    assert {"rng_state_rank0.pt", "rng_state_rank1.pt", "bigopt_state.json",
            COMPLETE_FILE} <= set(files), files
    assert any(f.endswith("model_states.pt") for f in files), files  # ZeRO-0: optimizer inside


def train_workers(since: float) -> list:
    """The training workers started after ``since`` (a run's, not an earlier test's)."""
    import psutil

    # the session's raylet is a child of this pytest process; its workers are its children
    return [p for p in psutil.Process().children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline() or [p.name()]) and p.create_time() >= since]


def start_run(cli: list[str], spec: Any, log_path: Any, endpoint: str, repo_root: str) -> Any:
    """``bigopt run SPEC`` in a subprocess whose S3 endpoint is ``endpoint`` (the proxy)."""
    with open(log_path, "w") as log:
        return subprocess.Popen([*cli, "run", str(spec)], cwd=repo_root, stdout=log,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "AWS_ENDPOINT_URL": endpoint})


def wait_for(event: threading.Event, proc: Any, log_path: Any, what: str) -> None:
    deadline = time.time() + 600
    while not event.wait(0.2):
        assert proc.poll() is None, f"the run ended before {what}: " + log_path.read_text()[-3000:]
        assert time.time() < deadline, f"no {what} in time"


def test_store_restart_mid_upload_then_worker_sigkill_resume_from_s3(
        ray_session, s3_server, proxy, tmp_path, repo_root):
    """`bigopt run` with the spec's defaults (precision auto: bf16 on CPU; failure handling)
    and checkpoints on S3. The server goes away while step 4's checkpoint uploads (the request
    that trips it is never forwarded; open connections are reset, new ones refused) and is
    back 6 s later: the upload retries with backoff in place, no worker-group restart. Then a
    worker is SIGKILLed mid-upload of step 6 (rank 1's RNG file is held back until then): Ray
    Train restarts the group, which resumes from step 4 on S3, not from step 0 and not from
    the half step 6, and the run completes with every checkpoint whole and marked complete."""
    storage = f"{s3_server}/faults"
    spec = tmp_path / "faults.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(storage, base=SMALL, name="faults",
                                             train={"max_steps": 8})))

    def restart() -> None:
        proxy.stop()
        threading.Timer(OUTAGE_S, proxy.start).start()

    proxy.arm(b"/checkpoints/step_000004/", restart, after=3)
    log_path, started = tmp_path / "run.log", time.time()
    proc = start_run([sys.executable, "-m", "bigopt.cli"], spec, log_path, proxy.endpoint, repo_root)
    try:
        wait_for(proxy.tripped, proc, log_path, "upload of step 4")
        proxy.arm(b"/checkpoints/step_000006/rng_state_rank1.pt", every=True)
        wait_for(proxy.tripped, proc, log_path, "upload of step 6")
        victims = train_workers(started)
        assert victims, "no RayTrainWorker process found"
        os.kill(victims[-1].pid, signal.SIGKILL)
        proxy.disarm()
        assert proc.wait(timeout=420) == 0, log_path.read_text()[-3000:]
    finally:
        proc.kill()
    run = RunDir(f"{storage}/faults/{run_id(s3_objects(f'{storage}/faults'))}")
    result = run.read_json("train/result.json")
    # one restart: the kill's; the outage cost none
    assert result["restarts"] == 1 and result["steps"] == 8, result
    assert result["resumed_from"] == 4, result  # the checkpoint the outage hit, whole
    logged = [r["step"] for r in run.read_jsonl("train/metrics.jsonl")]
    restart_at = next(i for i in range(1, len(logged)) if logged[i] <= logged[i - 1])
    assert logged == list(range(1, logged[restart_at - 1] + 1)) + [5, 6, 7, 8], logged
    found = checkpoints(run.uri)
    assert sorted(found) == ["step_000006", "step_000008"], found  # keep_last: 2
    for files in found.values():
        assert_whole(files)
    assert sorted(found["step_000006"]) == sorted(found["step_000008"])
    assert latest_checkpoint(run.stage("train")).endswith("/step_000008")


def test_a_run_killed_mid_upload_resumes_from_the_last_complete_checkpoint(
        ray_session, s3_server, proxy, tmp_path, repo_root):
    """Rank 1's RNG file of step 4 never gets through (each try is dropped); once rank 0's
    files are on the server the driver is SIGKILLed: step 4 is left half uploaded, with no
    marker. An explicit --resume of it is refused; --resume latest skips it, resumes from
    step 2 and completes the run."""
    storage = f"{s3_server}/faults"
    spec = tmp_path / "half.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(storage, base=SMALL, name="half")))
    proxy.arm(b"/checkpoints/step_000004/rng_state_rank1.pt", every=True)
    cli = [sys.executable, "-m", "bigopt.cli"]
    proc = start_run(cli, spec, tmp_path / "killed.log", proxy.endpoint, repo_root)
    try:
        wait_for(proxy.tripped, proc, tmp_path / "killed.log", "upload of step 4")
        run_uri = f"{storage}/half/{run_id(s3_objects(f'{storage}/half'))}"
        deadline = time.time() + 30  # within the held-back upload's tries
        while "rng_state_rank0.pt" not in checkpoints(run_uri).get("step_000004", []):
            assert time.time() < deadline, "rank 0's files of step 4 never arrived"
            time.sleep(0.1)
    finally:
        proc.kill()  # the whole run (SIGKILL), mid-upload
        proc.wait()
    proxy.stop()  # what is still trying to upload through it, fails
    found = checkpoints(run_uri)
    assert_whole(found["step_000002"])
    half = found["step_000004"]
    assert "rng_state_rank0.pt" in half and "rng_state_rank1.pt" not in half, half
    assert COMPLETE_FILE not in half

    half_uri = f"{run_uri}/train/checkpoints/step_000004"
    refused = subprocess.run([*cli, "train", str(spec), "--run-dir", run_uri, "--resume", half_uri],
                             cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "incomplete" in refused.stderr, refused.stderr[-2000:]
    resumed = subprocess.run([*cli, "run", str(spec), "--run-dir", run_uri, "--resume", "latest"],
                             cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    run = RunDir(run_uri)
    result = run.read_json("train/result.json")
    assert result["resumed_from"] == 2 and result["steps"] == 6, result
    # step 4 written again, whole; step 2 stays (the resume point of a new fit is not one
    # Ray Train registered, so keep_last does not delete it)
    found = checkpoints(run_uri)
    assert sorted(found) == ["step_000002", "step_000004", "step_000006"], found
    for files in found.values():
        assert_whole(files)
    assert latest_checkpoint(run.stage("train")).endswith("/step_000006")
