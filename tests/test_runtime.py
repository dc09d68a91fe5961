"""Run directories on local disk and on a real S3-protocol server; Ray on loopback."""

from __future__ import annotations

import pytest

from bigopt.runtime import RunDir, embedded_cpus, filesystem_for


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


def test_embedded_ray_keeps_a_cpu_for_data_readers():
    assert embedded_cpus(2) >= 3
    assert embedded_cpus(2, requested=8) == 8


def test_session_ray_is_on_loopback(ray_session):
    import ray

    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
