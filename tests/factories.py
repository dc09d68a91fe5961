"""The test suite's shared helpers: one spec factory, one free-port helper.

``make_spec``/``spec_dict`` build a job spec from a small base merged with what the test
says: nested dicts merge key by key, ``None`` removes a section. ``TINY`` is a complete small
run (stdlib text, a 2-layer GPT, 2 workers) with the user's defaults (precision auto: bf16 on
CPU; the default data order and failure handling): cheap enough for many Ray Train runs. A test
that needs another precision sets it and says why.
``BARE`` is the least a spec holds, for validation tests.
"""

from __future__ import annotations

import copy
import socket
from typing import Any

import torch
from torch import nn

from bigopt.spec import JobSpec, parse_spec

TINY: dict[str, Any] = {
    "name": "t",
    "cluster": {"num_workers": 2},
    "data": {"source": {"kind": "text_tree", "path": "stdlib", "max_files": 40},
             "split": {"val": 0.1}},
    "model": {"kind": "gpt", "n_layer": 2, "n_head": 2, "d_model": 32, "context": 32},
    "train": {"strategy": "deepspeed", "zero": {"stage": 0}, "batch_size": 4,
              "max_steps": 20, "log_every": 1, "eval_every": 0, "eval_batches": 2,
              "checkpoint_every": 10, "keep_last": 2, "seed": 0},
}
BARE: dict[str, Any] = {"name": "t", "model": {"kind": "gpt"}, "train": {}}


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def spec_dict(storage: str | None = None, *, base: dict[str, Any] = TINY, **sections: Any) -> dict[str, Any]:
    raw = merge(base, sections)
    if storage is not None:
        raw["storage"] = str(storage)
    return raw


def make_spec(storage: str | None = None, *, base: dict[str, Any] = TINY, **sections: Any) -> JobSpec:
    return parse_spec(spec_dict(storage, base=base, **sections))


def run_cli(repo_root: str, spec: dict[str, Any], tmp_path: Any, *args: str,
            timeout: int = 1500) -> tuple[Any, str]:
    """``bigopt <command> SPEC --set storage=tmp_path ...`` in a subprocess, as a user types it
    (``args[0]`` is the command, default ``run``); returns (process, the run dir or "")."""
    import glob
    import subprocess
    import sys

    import yaml

    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    command, rest = (args[0], args[1:]) if args else ("run", ())
    proc = subprocess.run([sys.executable, "-m", "bigopt.cli", command, str(path),
                           "--set", f"storage={tmp_path}", *rest],
                          cwd=repo_root, capture_output=True, text=True, timeout=timeout)
    runs = glob.glob(str(tmp_path / spec["name"] / "*"))
    return proc, runs[0] if runs else ""


def cli_validate(repo_root: str, tmp_path: Any, spec: dict[str, Any]) -> tuple[int, set[str], str]:
    """``bigopt validate`` on ``spec``: (exit code, the field paths named, stderr)."""
    import subprocess
    import sys

    import yaml

    path = tmp_path / "validate.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, "-m", "bigopt.cli", "validate", str(path)], cwd=repo_root,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, {line.split(":")[0] for line in proc.stderr.splitlines()}, proc.stderr


class CallCounter(nn.Module):
    """Scales its output by how many times it was called: Python state that an export
    freezes, so the exported file honestly disagrees with eager PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x) * self.calls


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def drive_searcher(searcher: Any, objective: Any, trials: int, *, start: int = 0,
                   metric: str = "acc") -> list[dict[str, Any]]:
    """Trials ``start``..``trials - 1`` of a Tune ``Searcher`` driven as a sequential Tuner
    does (suggest -> on_trial_complete with ``objective(config)``); the configs, in order."""
    configs = []
    for i in range(start, trials):
        config = searcher.suggest(f"t{i}")
        configs.append(config)
        searcher.on_trial_complete(f"t{i}", {metric: objective(config)})
    return configs


def rejected_rows(run: Any, step: str | None = None) -> list[dict[str, Any]]:
    """Every row of ``<run>/data/rejects/**/*.parquet`` (a RunDir), or only ``step``'s."""
    import pyarrow.parquet as pq

    rows = []
    for rel in run.list("data/rejects"):
        if rel.endswith(".parquet"):
            with run.fs.open_input_file(run.sub(rel)) as f:
                rows += pq.read_table(f).to_pylist()
    return [r for r in rows if step is None or r["step"] == step]


def dirty_text_rows(files: int = 60, seed: int = 0) -> list[dict[str, Any]]:
    """Rows ``{path, text, reject_reason}`` as a text reader gives them: ``files`` real stdlib
    sources (sorted, from the 40th on: past the tiny ``__init__`` files) plus what cleaning
    must catch: a read reject, an empty and a non-UTF-8 text, a too-short one, byte-identical
    copies, and near-copies (a few lines edited)."""
    import random

    from bigopt.data.text import list_files, resolve_root

    root = resolve_root("stdlib")
    names = list_files(root, ["*.py"], ["site-packages/*", "test/*"], files + 40)[40:]
    texts = {name: (root / name).read_bytes() for name in names}
    rng = random.Random(seed)
    for name in names[:6]:  # near-copies: ~2 % of the lines changed
        lines = texts[name].splitlines(keepends=True)
        for i in rng.sample(range(len(lines)), max(1, len(lines) // 50)):
            lines[i] = b"# edited\n"
        texts[f"near/{name}"] = b"".join(lines)
    for name in names[6:9]:
        texts[f"copy/{name}"] = texts[name]
    texts.update({"bad/empty.py": b"  \n", "bad/latin1.py": "caf\xe9 = 1\n".encode("latin-1"),
                  "bad/tiny.py": b"x"})
    rows = [{"path": p, "text": t, "reject_reason": ""} for p, t in sorted(texts.items())]
    rows.append({"path": "bad/unreadable.py", "text": b"", "reject_reason": "unreadable: OSError"})
    return rows


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 in front of ``target`` (host, port) that can be taken down
    and brought back on the same port: to a client, the server restarting (connections reset
    mid-transfer, then refused, then accepted again)."""

    def __init__(self, target: tuple[str, int]):
        import socket
        import threading

        self.target, self.port = target, free_port()
        self._lock, self._conns, self._listener = threading.Lock(), [], None
        self._socket, self._threading = socket, threading
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = self._socket.socket()
        listener.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Closes the listener and resets every open connection."""
        import struct

        listener, self._listener = self._listener, None
        if listener is not None:
            try:  # wakes the thread blocked in accept(): close() alone keeps the port bound
                listener.shutdown(self._socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:  # RST, not FIN: the peer sees "connection reset", as from a dying server
                conn.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            except OSError:
                pass

    def _accept(self, listener: Any) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = self._socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: Any, dst: Any) -> None:
        try:
            # requests only: a listing the server sends back names keys too
            request = src.getpeername()[1] != self.target[1]
            while data := src.recv(65536):
                if request and self._drop(data):
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def _drop(self, data: bytes) -> bool:
        """Whether to drop (not forward) this chunk of a request: never, here."""
        return False


class TrippingProxy(TcpProxy):
    """A ``TcpProxy`` that trips on the ``after``-th request whose bytes contain ``pattern``
    (part of an S3 key, e.g. ``b"/checkpoints/step_000004/"``; plain HTTP only): it drops that
    request unforwarded (closes its connection: the server never saw it, so a retry is safe
    whatever the request was), sets ``tripped`` and calls ``on_trip`` from a thread of its own
    (say, ``stop``: the server restarting right then). With ``every``, every later matching
    request is dropped too: an object whose upload never gets through."""

    def __init__(self, target: tuple[str, int]):
        import threading

        self.tripped = threading.Event()
        self.matched, self._armed = 0, None
        super().__init__(target)

    def arm(self, pattern: bytes, on_trip: Any = None, *, after: int = 1, every: bool = False) -> None:
        self.tripped.clear()
        self.matched, self._armed = 0, (pattern, on_trip, after, every)

    def disarm(self) -> None:
        """Forward everything again."""
        self._armed = None

    def _drop(self, data: bytes) -> bool:
        armed = self._armed
        if armed is None or armed[0] not in data:
            return False
        pattern, on_trip, after, every = armed
        with self._lock:
            self.matched += 1
            if self.matched < after:
                return False
            first = not self.tripped.is_set()
            self.tripped.set()
            if not every:
                self._armed = None
        if first and on_trip is not None:
            self._threading.Thread(target=on_trip, daemon=True).start()
        return True


def s3_objects(uri: str, endpoint: str | None = None) -> list[str]:
    """Keys under ``uri`` (s3://bucket/prefix), relative to it, as the server at ``endpoint``
    (default ``AWS_ENDPOINT_URL``) lists them: the store's own view."""
    import os

    import boto3

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    client = boto3.client("s3", endpoint_url=endpoint or os.environ.get("AWS_ENDPOINT_URL"))
    keys, token = [], None
    while True:
        page = client.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/",
                                      **({"ContinuationToken": token} if token else {}))
        keys += [o["Key"][len(prefix.rstrip("/")) + 1:] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return sorted(keys)
        token = page["NextContinuationToken"]


def finished_run(storage: Any, job: str, run_id: str, *, metrics: dict[str, float] | None,
                 fingerprint: str = "f" * 64, params: int = 1000, wall_s: float | None = 60.0,
                 report: dict[str, Any] | None = None) -> Any:
    """A run directory as ``bigopt run`` leaves it for the report to read: ``spec.yaml``,
    ``run.json``, the data artifact and, unless ``metrics`` is None (a run cut short), the
    train stage's model artifact. For report tests that set runs side by side without
    training each one."""
    import yaml

    from bigopt.artifacts import DataArtifact, ModelArtifact, write_artifact
    from bigopt.report.compare import timing_record
    from bigopt.runtime import RunDir

    run = RunDir.create(str(storage), job, run_id)
    spec = {"name": job, "report": report} if report else {"name": job}
    run.write_text("spec.yaml", yaml.safe_dump(spec))
    data = DataArtifact(stage="data", run=run.uri, uri=run.uri_of("data"), manifest="m",
                        fingerprint=fingerprint, task="classifier", columns=("inputs", "labels"),
                        splits={})
    write_artifact(run.stage("data"), data)
    if metrics is not None:
        write_artifact(run.stage("train"), ModelArtifact(
            stage="train", run=run.uri, uri=run.uri_of("train"), parent=data.artifact_uri,
            task="classifier", arch={}, format="ddp", step=100, metrics=metrics, params=params))
    if wall_s is not None:
        run.write_json("run.json", timing_record(None, wall_s, {"data": 1.0, "train": wall_s - 1}))
    return run
