"""Metrics maths and the JSONL sink (resumed runs continue their file)."""

from __future__ import annotations

from bigopt.runtime import RunDir
from bigopt.train.metrics import JsonlSink, MetricsProcessor, peak_flops


def test_throughput_wait_fraction_and_mfu(tmp_path):
    run = RunDir.create(str(tmp_path), "m", run_id="r").stage("train")
    sink = JsonlSink(run)
    mp = MetricsProcessor([sink], log_every=2, samples_per_step=32, tokens_per_sample=128,
                          flops_per_sample=1e9, peak_flops_total=1e12)
    assert mp.record(1, loss=4.0, step_time=0.5, data_wait=0.1, lr=1e-3) is not None  # step 1
    assert mp.record(2, loss=3.0, step_time=0.5, data_wait=0.0, lr=1e-3) is not None
    assert mp.record(3, loss=2.0, step_time=0.25, data_wait=0.05, lr=1e-3) is None
    row = mp.record(4, loss=1.0, step_time=0.75, data_wait=0.05, lr=1e-3)
    assert row["loss"] == 1.5  # mean over the window since the last log point
    assert row["samples_per_s"] == 64.0 and row["tokens_per_s"] == 64.0 * 128
    assert abs(row["data_wait_frac"] - 0.1) < 1e-12
    assert row["flops_per_s"] == 64e9 and abs(row["mfu"] - 0.064) < 1e-12
    mp.close()
    assert [r["step"] for r in run.read_jsonl("metrics.jsonl")] == [1, 2, 4]
    resumed = JsonlSink(run)
    resumed.log(5, {"loss": 0.5})
    resumed.close()
    assert [r["step"] for r in run.read_jsonl("metrics.jsonl")] == [1, 2, 4, 5]


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops(None) is None and peak_flops("Some CPU") is None
