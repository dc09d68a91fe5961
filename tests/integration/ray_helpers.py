"""Helpers for the integration tests: a Ray head of our own, on loopback, stopped by us.

(A plain module, not a conftest.py: tests/conftest.py already owns that module name.)

Every process these tests start lives in its own process group and its own Ray temp dir
(``RAY_TMPDIR``), so tearing down kills exactly what we started and nothing else: never
``ray stop``, which stops every Ray on the host, other people's included. All ports are
picked free (never 6379/8265/10001/52365, which other clusters on the machine may hold).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = os.path.dirname(sys.executable)  # where `ray` and `bigopt` are installed
TOKEN_FILE = Path.home() / ".ray" / "auth_token"


from factories import free_port  # noqa: E402,F401  (re-exported for the integration tests)


def short_tmpdir(prefix: str) -> str:
    # Ray puts Unix sockets under its temp dir; AF_UNIX paths must stay under ~107 bytes.
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def ray_env(tmp: str, **extra: str) -> dict[str, str]:
    """Environment for a Ray process or client we start: loopback, token auth, our temp dir."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # bind and advertise 127.0.0.1, not eth0
        RAY_TMPDIR=tmp,  # sessions and the ray_current_cluster file stay out of /tmp/ray
        RAY_AUTH_MODE="token",  # the head enforces the token, clients send it
        RAY_USAGE_STATS_ENABLED="0",
        PATH=VENV_BIN + os.pathsep + env.get("PATH", ""),  # jobs find `bigopt` here
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def auth_headers() -> dict[str, str]:
    """The bearer header a client sends (what RAY_AUTH_MODE=token does from ~/.ray/auth_token)."""
    return {"Authorization": "Bearer " + TOKEN_FILE.read_text().strip()}


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (our unique temp dir): what we left running."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            pids.append(int(d.name))
    return pids


def wait_job(client, job_id: str, timeout: float) -> str:
    """Poll a job to a terminal status; returns it (raises TimeoutError with the log tail)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status.value)
        time.sleep(2)
    raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s; log tail:\n"
                       + client.get_job_logs(job_id)[-3000:])


class RayHead:
    """``ray start --head --block`` on 127.0.0.1 with free ports, in its own process group."""

    def __init__(self, *, num_cpus: int, extra_args: list[str] = (), env: dict | None = None,
                 prefix: str = "bo", gcs_port: int | None = None):
        self.tmp = short_tmpdir(prefix)
        self.gcs_port, self.dashboard_port = gcs_port or free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = ray_env(self.tmp, **(env or {}))
        self.log_path = os.path.join(self.tmp, "ray_start.log")
        cmd = [
            os.path.join(VENV_BIN, "ray"), "start", "--head", "--block",
            "--port", str(self.gcs_port),
            "--dashboard-host=127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--dashboard-agent-listen-port", str(free_port()),
            "--ray-client-server-port", str(free_port()),
            "--min-worker-port=0", "--max-worker-port=0",
            f"--num-cpus={num_cpus}", "--disable-usage-stats", "--temp-dir", self.tmp,
            *extra_args,
        ]
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=REPO, start_new_session=True,
                                     stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "".join(open(self.log_path).readlines()[-n:])
        except OSError:
            return ""

    def client(self):
        """A JobSubmissionClient for this head, sending the token itself.

        RAY_AUTH_MODE=token only takes effect if set before ``ray`` is imported, which pytest
        cannot promise; an explicit Authorization header always works.
        """
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=auth_headers())

    def wait_ready(self, timeout: float = 180) -> None:
        """Until the head accepts and runs a trivial job (dashboard, job agent, raylet all up).

        The dashboard answers before the head's job agent has registered ("No available
        agent to submit job"), so a probe job is the honest readiness check.
        """
        deadline = time.time() + timeout
        last: object = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                req = urllib.request.Request(self.dashboard_url + "/api/jobs/",
                                             headers=auth_headers())
                with urllib.request.urlopen(req, timeout=5):
                    pass
                client = self.client()
                job = client.submit_job(entrypoint="true")
                wait_job(client, job, timeout=max(10.0, deadline - time.time()))
                return
            except Exception as exc:  # not up yet: connection refused, 500 no agent, ...
                last = exc
                time.sleep(2)
        raise TimeoutError(f"Ray head not ready after {timeout:.0f} s ({last}):\n{self.log_tail()}")

    def stop(self, timeout: float = 20) -> list[int]:
        """Terminate our process group; kill stragglers by pid. Returns pids still alive."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        deadline = time.time() + timeout
        while (left := processes_mentioning(self.tmp)) and time.time() < deadline:
            time.sleep(1)
        for pid in left:  # ours: their command line names our private temp dir
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)
        left = processes_mentioning(self.tmp)
        if not left:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return left


# --------------------------------------------------------------------------- run artifacts
SHORT = [  # the quickstart, shortened to seconds of training
    "--set", "train.max_steps=10", "--set", "train.schedule.warmup_steps=2",
    "--set", "data.source.max_files=60", "--set", "train.eval_every=0",
    "--set", "train.checkpoint_every=0",
]
METRIC_KEYS = {"step", "loss", "lr", "samples_per_s", "tokens_per_s", "data_wait_frac"}


def only_run_dir(storage: Path, name: str) -> Path:
    runs = sorted((storage / name).iterdir()) if (storage / name).is_dir() else []
    assert len(runs) == 1, f"expected one run dir under {storage / name}, found {runs}"
    return runs[0]


def check_run_artifacts(run: Path, *, max_steps: int = 10) -> Path:
    """The run directory contract; returns the newest checkpoint dir."""
    import json

    assert (run / "spec.yaml").is_file()
    m = json.loads((run / "data" / "manifest.json").read_text())
    assert m["rows_in"] == m["rows_kept"] + m["rows_rejected"], m
    assert sum(s["files"] for s in m["splits"].values()) <= m["rows_kept"], m
    for name, split in m["splits"].items():
        assert sum(sh["rows"] for sh in split["shards"]) == split["rows"], name
    rows = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    assert rows, "metrics.jsonl is empty"
    for row in rows:
        missing = METRIC_KEYS - row.keys()
        assert not missing, f"metrics row {row.get('step')} lacks {sorted(missing)}"
    assert rows[-1]["step"] == max_steps
    assert json.loads((run / "train" / "result.json").read_text())["steps"] == max_steps
    ckpts = sorted((run / "train" / "checkpoints").glob("step_*"))
    assert ckpts and ckpts[-1].name == f"step_{max_steps:06d}", ckpts
    assert any(ckpts[-1].rglob("*model_states.pt")), list(ckpts[-1].rglob("*"))
    assert (run / "report.md").is_file()
    return ckpts[-1]
