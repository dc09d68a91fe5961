"""Run directories on local disk and on a real S3-protocol server; Ray on loopback."""

from __future__ import annotations

import os

import pytest

from bigopt.runtime import S3_MAX_ATTEMPTS, RunDir, embedded_cpus, filesystem_for


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    return request.getfixturevalue("s3_server") + "/runs"


def test_run_dir_round_trip(storage):
    run = RunDir.create(storage, "job", run_id="r1")
    assert run.uri.endswith("/job/r1") and run.uri.startswith(storage.split("/runs")[0][:5])
    run.write_json("data/manifest.json", {"rows_in": 3})
    run.write_text("train/metrics.jsonl", '{"step": 1}\n{"step": 2}\n')
    assert run.read_json("data/manifest.json") == {"rows_in": 3}
    assert [r["step"] for r in run.read_jsonl("train/metrics.jsonl")] == [1, 2]
    assert run.list("") == ["data/manifest.json", "train/metrics.jsonl"]
    assert run.exists("data/manifest.json") and not run.exists("nope")


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        filesystem_for("gs://bucket/x")


def test_s3_requests_retry_through_an_outage_also_after_pickling(s3_server, monkeypatch):
    """Ray Train pickles the storage filesystem to the workers, which upload the checkpoints:
    the retries must survive pickling, which pyarrow's own pickling drops (apache/arrow
    GH-47348). The endpoint goes away for 5 s (connections refused; the AWS SDK's default 3
    tries give up within 3 s) and comes back: a write through the unpickled filesystem waits
    it out."""
    import pickle
    import threading
    from urllib.parse import urlparse

    import pyarrow.fs as pafs

    from factories import TcpProxy

    server = urlparse(os.environ["AWS_ENDPOINT_URL"])
    proxy = TcpProxy((server.hostname, server.port))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    fs, path = filesystem_for(f"{s3_server}/retries")
    remote = pickle.loads(pickle.dumps(fs))
    assert isinstance(remote, pafs.S3FileSystem) and remote.max_attempts == S3_MAX_ATTEMPTS
    plain = pickle.loads(pickle.dumps(pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{proxy.port}", scheme="http", region=fs.region)))
    proxy.stop()
    threading.Timer(5.0, proxy.start).start()
    try:
        with pytest.raises(OSError):  # if this starts passing, pyarrow pickles retries now
            with plain.open_output_stream(f"{path}/plain") as out:
                out.write(b"x")
        with remote.open_output_stream(f"{path}/kept") as out:
            out.write(b"checkpoint bytes")
        with fs.open_input_stream(f"{path}/kept") as src:
            assert src.read() == b"checkpoint bytes"
    finally:
        proxy.stop()


def test_aws_max_attempts_sets_the_tries(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert filesystem_for("s3://bucket/x")[0].max_attempts == 2
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "many")
    with pytest.raises(ValueError, match="AWS_MAX_ATTEMPTS='many'"):
        filesystem_for("s3://bucket/x")


def test_embedded_ray_keeps_a_cpu_for_data_readers():
    assert embedded_cpus(2) >= 3
    assert embedded_cpus(2, requested=8) == 8


def test_session_ray_is_on_loopback(ray_session):
    import ray

    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())


SPILL_PROBE = """
import glob, json, os, sys, time
import numpy as np
import ray
from bigopt.runtime import connect_ray

connect_ray(num_cpus=1, log_to_driver=False)

def spilled():
    return sum(os.path.getsize(f) for d in glob.glob(ray._private.worker._global_node.get_session_dir_path()
                                                      + "/ray_spilled_objects*")
               for f in glob.glob(d + "/*"))

refs = [ray.put(np.full(10_000_000, i, dtype=np.uint8)) for i in range(50)]  # 500 MB, store ~100 MB
time.sleep(2)
before = spilled()
kept = refs[0]  # spilled first, so it shares a file with the others under Ray's fusing
del refs
for _ in range(30):
    time.sleep(1)
    if spilled() < 30_000_000:
        break
print(json.dumps({"before": before, "after": spilled(), "kept_ok": int(ray.get(kept)[0]) == 0}))
"""


@pytest.mark.slow
def test_a_spill_file_goes_when_its_object_is_freed(tmp_path):
    """The embedded Ray spills one object per file: with Ray's default fusing, the one object
    still referenced would keep its whole file (and the freed objects beside it) on disk, which
    filled the disk at 10M rows (BENCHMARKS 7c)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_max_fused_object_count")}
    # a ~100 MB object store (Ray's floor is 75 MiB), whatever the machine's memory
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    env["RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION"] = str(100e6 / memory)
    out = subprocess.run([sys.executable, "-c", SPILL_PROBE], capture_output=True, text=True, env=env,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["before"] > 250_000_000, probe  # it did spill most of the 500 MB
    assert probe["kept_ok"]
    assert probe["after"] < 30_000_000, probe  # only the kept object's 10 MB stays
