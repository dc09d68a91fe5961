"""Helpers for the integration tests: a Ray head of our own, on loopback, stopped by us.

Every process these tests start lives in its own process group and its own Ray temp dir
(``RAY_TMPDIR``), so tearing down kills exactly what we started and nothing else: never
``ray stop``, which stops every Ray on the host, other people's included. All ports are
picked free (never 6379/8265/10001/52365, which other clusters on the machine may hold).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = os.path.dirname(sys.executable)  # where `ray` and `bigopt` are installed
TOKEN_FILE = Path.home() / ".ray" / "auth_token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    def wait_ready(self, timeout: float = 120) -> None:
        """Until the job API answers (an authenticated GET) and the head raylet is up."""
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                req = urllib.request.Request(self.dashboard_url + "/api/jobs/",
                                             headers=auth_headers())
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(1)
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


@pytest.fixture
def repo() -> Path:
    return REPO
