"""Where a run executes (Ray) and where it writes (local disk or S3).

This is the one module that reads ``RAY_ADDRESS``, the AWS endpoint variables and Ray's
loopback switch, so nothing deeper in the code depends on the environment.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import secrets
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

log = logging.getLogger("bigopt")


# --------------------------------------------------------------------------- Ray
def embedded_cpus(train_cpus: float, requested: int | None = None) -> int:
    """CPU slots for an embedded Ray: this machine's cores, and at least one more than training.

    Ray CPUs are scheduling slots. If the training workers take every slot, Ray Data cannot
    schedule the read tasks that feed them and the job deadlocks (seen on a 2-core machine
    with 2 workers); one spare slot keeps the input pipeline running beside training.
    """
    if requested:
        return requested
    return max(os.cpu_count() or 1, math.ceil(train_cpus) + 1)


def _address_of_local_ray_start() -> str | None:
    """The address `ray start` recorded on this machine, if that cluster is up.

    Not ``ray.init(address="auto")``: that also finds other processes' embedded Rays (another
    user's test session, say) and would run this job on them.
    """
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address()
    except Exception:  # private API moved, or no file: behave as if nothing is running
        return None


def cluster_answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (a live GCS does at once)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def connect_ray(address: str | None = None, *, num_cpus: int | None = None,
                log_to_driver: bool = True) -> str:
    """Join a cluster (``address``, ``RAY_ADDRESS`` or one running here), else start Ray locally.

    An embedded Ray binds to 127.0.0.1: Ray advertises eth0 by default, and
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read when ``ray`` is first imported) keeps it on
    loopback. We only set it when no cluster address is known, so joining a real multi-node
    cluster (e.g. under ``ray job submit``, which sets RAY_ADDRESS) keeps the node's real IP.
    ``log_to_driver=False`` keeps workers' output off this process's console (bigopt's
    quiet console; the training workers write their own log files). Returns "cluster" or
    "embedded".
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return "cluster" if address else "embedded"
    if address is not None:
        ray.init(address=address, log_to_driver=log_to_driver)
        log.info("joined Ray cluster at %s", address)
        return "cluster"
    running = _address_of_local_ray_start()
    if running is not None and not cluster_answers(running):
        # A `ray start` cluster that died without `ray stop` leaves its address file behind;
        # ray.init would retry that address for minutes. A refused TCP connect says it at once.
        log.info("the Ray cluster recorded at %s (by `ray start`) does not answer: a stale "
                 "record; starting an embedded Ray instead", running)
        running = None
    if running is not None:  # a cluster started on this machine with `ray start`
        try:
            ray.init(address=running, log_to_driver=log_to_driver)
            log.info("joined the Ray cluster `ray start` runs on this machine (%s)", running)
            return "cluster"
        except (ConnectionError, RuntimeError) as exc:  # answered, then failed
            log.info("no Ray cluster answers at %s (%s); starting an embedded one", running, exc)
    # The dashboard (on 127.0.0.1) serves the state API that Ray Train's placement-group
    # cleaner polls; without it that actor retries in a busy loop.
    # address="local": a new instance even where a `ray start` record exists (plain ray.init()
    # would try to join the recorded cluster, dead or not).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=log_to_driver,
             _system_config={} if "RAY_max_fused_object_count" in os.environ else SPILL_CONFIG)
    log.info("started an embedded local Ray on 127.0.0.1 with %s CPU slots",
             ray.cluster_resources().get("CPU"))
    return "embedded"


#: Ray's object spilling for the embedded instance. Ray fuses up to 2,000 spilled objects into one
#: file and deletes a file only when every object in it is freed, so one long-lived block (a
#: step's kept rows) keeps the whole file, and the freed intermediates beside it, on disk to the
#: end of the stage: at 10M rows that filled a 73 GB disk. One object per file lets each spill file
#: go with its object (BENCHMARKS 7c). A cluster started by `ray start` takes the same setting
#: from ``RAY_max_fused_object_count=1`` in its environment (clusters/*.yaml); that variable, set
#: by the user, also wins here.
SPILL_CONFIG = {"max_fused_object_count": 1}


# --------------------------------------------------------------------------- storage
#: tries per S3 request before an error reaches bigopt or Ray (``AWS_MAX_ATTEMPTS`` overrides
#: it). The AWS SDK's standard retry mode waits a random 0..2^n s before retry n, each wait
#: capped at 20 s: 8 tries ride out a store that restarts or is unreachable for tens of
#: seconds (~45 s of waiting on average, ~70 s at most, before the error), where the SDK's
#: default of 3 gives up within 3 s. A checkpoint upload that still fails fails its worker,
#: and Ray Train restarts the group from the last complete checkpoint.
S3_MAX_ATTEMPTS = 8


class RetryingS3FileSystem(pafs.S3FileSystem):
    """``pyarrow.fs.S3FileSystem`` with the AWS SDK's standard retries, ``max_attempts`` tries
    per request, that keeps them when pickled.

    pyarrow's own pickling drops ``retry_strategy`` (apache/arrow GH-47348, fix not released in
    pyarrow 26): Ray Train pickles the storage filesystem to every training worker, where the
    checkpoint uploads run, which then retried 3 times. Unpickled, this class builds itself
    again with the same options and the same ``max_attempts``.
    """

    def __init__(self, *, max_attempts: int = S3_MAX_ATTEMPTS, **kwargs: Any):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
                         **kwargs)
        self.max_attempts = max_attempts

    def __reduce__(self) -> tuple[Any, ...]:
        _, (options,) = super().__reduce__()  # every option but the retry strategy
        return _retrying_s3, (options, self.max_attempts)


def _retrying_s3(options: dict[str, Any], max_attempts: int) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts=max_attempts, **options)


def s3_max_attempts() -> int:
    """Tries per S3 request: ``AWS_MAX_ATTEMPTS`` (the AWS SDKs' own setting) or ``S3_MAX_ATTEMPTS``."""
    raw = os.environ.get("AWS_MAX_ATTEMPTS")
    if raw is None:
        return S3_MAX_ATTEMPTS
    try:
        attempts = int(raw)
    except ValueError:
        attempts = 0
    if attempts < 1:
        raise ValueError(f"AWS_MAX_ATTEMPTS={raw!r}: expected a whole number of tries per S3 "
                         f"request, at least 1 (unset: {S3_MAX_ATTEMPTS})")
    return attempts


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an ``s3://`` URI.

    For S3-compatible servers (MinIO, moto) set ``AWS_ENDPOINT_URL``; credentials come from the
    usual AWS variables / profile / instance role. S3 requests retry with backoff
    (``S3_MAX_ATTEMPTS``), in this process and in every Ray worker the filesystem is sent to.
    """
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return (RetryingS3FileSystem(max_attempts=s3_max_attempts(), **kwargs),
                uri[len("s3://") :].rstrip("/"))
    if "://" in uri:
        raise ValueError(f"storage: unsupported URI scheme in {uri!r}; use a path or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


@dataclass(frozen=True)
class RunDir:
    """``<storage>/<name>/<run-id>/`` on local disk or S3, addressed by relative paths."""

    uri: str  # as the user would type it: /abs/path/... or s3://bucket/...

    @classmethod
    def create(cls, storage: str, name: str, run_id: str | None = None) -> RunDir:
        """A new run dir. The id is the start time plus 32 random bits, so many trials starting
        in the same second do not collide; on local disk the directory is also created
        exclusively (a clash, however unlikely, draws a new id instead of sharing a dir)."""
        fs, base = filesystem_for(storage)
        prefix = "s3://" if storage.startswith("s3://") else ""
        for _ in range(100):
            rid = run_id or (_dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(4))
            run = cls(f"{prefix}{base}/{name}/{rid}")
            if not prefix:
                os.makedirs(os.path.dirname(run.path), exist_ok=True)
                try:
                    os.mkdir(run.path)
                except FileExistsError:
                    if run_id:  # an id the caller chose: reuse it, as before
                        return run
                    continue
                return run
            fs.create_dir(run.path, recursive=True)
            return run
        raise RuntimeError(f"could not create a unique run dir under {base}/{name}")

    def stage(self, name: str) -> RunDir:
        """The view a stage writes through: ``<run>/<name>/``, addressed by paths relative to it.

        The pipeline hands each stage its own view, so no stage module names another stage's
        folder (a fine-tuning stage running the trainer writes ``<run>/compress/...``, not
        ``<run>/train/...``)."""
        return RunDir(self.uri_of(name))

    @property
    def name(self) -> str:
        """The last component of the URI (a stage view's stage name, a run dir's run id)."""
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> RunDir:
        """The directory above (a stage view's run dir)."""
        return RunDir(self.uri.rstrip("/").rsplit("/", 1)[0])

    def contains(self, uri: str) -> bool:
        """Whether ``uri`` (a path or URI) lies inside this directory."""
        if "://" in uri and not uri.startswith("s3://"):
            return False
        fs_path = filesystem_for(uri)[1] if (uri.startswith("s3://") == (not self.is_local)) else None
        if fs_path is None:
            return False
        return fs_path == self.path or fs_path.startswith(self.path + "/")

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem_for(self.uri)[0]

    @property
    def path(self) -> str:
        """Path inside ``fs`` (what pyarrow and Ray's ``storage_filesystem`` expect)."""
        return filesystem_for(self.uri)[1]

    @property
    def is_local(self) -> bool:
        return not self.uri.startswith("s3://")

    def sub(self, rel: str) -> str:
        """Path of ``rel`` inside ``fs``."""
        return f"{self.path}/{rel}".rstrip("/")

    def uri_of(self, rel: str) -> str:
        return f"{self.uri}/{rel}".rstrip("/")

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.sub(rel)).type != pafs.FileType.NotFound

    def write_bytes(self, rel: str, data: bytes) -> None:
        fs = self.fs
        parent = self.sub(rel).rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(self.sub(rel)) as out:
            out.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.sub(rel)) as src:
            return src.read().decode()

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def read_jsonl(self, rel: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.read_text(rel).splitlines() if line.strip()]

    def folders(self, rel: str = "") -> list[str]:
        """Names of the folders directly under ``rel``, sorted ([] when ``rel`` is absent)."""
        sel = pafs.FileSelector(self.sub(rel), recursive=False, allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.Directory)

    def list(self, rel: str) -> list[str]:
        """Relative paths of files under ``rel`` (recursive), sorted."""
        sel = pafs.FileSelector(self.sub(rel), recursive=True, allow_not_found=True)
        base = self.path + "/"
        return sorted(
            i.path[len(base):] for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File
        )
