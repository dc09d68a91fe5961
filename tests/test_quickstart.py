"""The quickstart end to end through the real CLI: stdlib code -> Parquet -> Ray Train x
DeepSpeed ZeRO-2 (bf16 on CPU) -> checkpoints, metrics, report. Shortened with --set."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

REQUIRED_METRICS = {"step", "loss", "lr", "samples_per_s", "tokens_per_s", "data_wait_frac"}


@pytest.mark.slow
def test_quickstart_end_to_end(ray_session, repo_root, tmp_path):
    cmd = [sys.executable, "-m", "bigopt.cli", "run", "jobs/quickstart.yaml",
           "--set", f"storage={tmp_path}", "--set", "data.source.max_files=80",
           "--set", "train.max_steps=40", "--set", "train.eval_every=20",
           "--set", "train.checkpoint_every=20", "--set", "train.log_every=5"]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "quickstart" / "*"))
    # a console a person can read: a bar and a few lines per stage; the rest in <run>/logs/
    console = (proc.stdout + proc.stderr).splitlines()
    assert len(console) <= 40, "\n".join(console)
    assert not [line for line in console if "Warning" in line or "WARNING" in line], console
    assert os.path.getsize(os.path.join(run_dir, "logs", "driver.log")) > 0
    assert glob.glob(os.path.join(run_dir, "logs", "train-rank*.log"))

    spec_text = open(os.path.join(run_dir, "spec.yaml")).read()
    assert "precision: bf16" in spec_text  # `auto` resolved and recorded

    manifest = json.load(open(os.path.join(run_dir, "data", "manifest.json")))
    assert manifest["rows_in"] == 80 == manifest["rows_kept"] + manifest["rows_rejected"]
    assert set(manifest["splits"]) == {"train", "val"}

    rows = [json.loads(x) for x in open(os.path.join(run_dir, "train", "metrics.jsonl"))]
    assert rows and all(REQUIRED_METRICS <= set(r) for r in rows), rows[0]
    assert rows[-1]["step"] == 40
    assert all(0 <= r["data_wait_frac"] <= 1 and r["samples_per_s"] > 0 for r in rows)
    # every rank's data wait and read rate at every log point (2 workers)
    assert all(len(r["data_wait_frac_by_rank"]) == 2 == len(r["rows_read_per_s_by_rank"])
               and all(0 <= w <= 1 for w in r["data_wait_frac_by_rank"]) for r in rows)

    # Checkpoints: every rank's ZeRO shard is in each kept checkpoint.
    ckpts = sorted(glob.glob(os.path.join(run_dir, "train", "checkpoints", "step_*")))
    assert [os.path.basename(c) for c in ckpts] == ["step_000020", "step_000040"]
    shards = os.listdir(os.path.join(ckpts[-1], "state"))
    assert any("zero_pp_rank_0" in s for s in shards) and any("zero_pp_rank_1" in s for s in shards)

    result = json.load(open(os.path.join(run_dir, "train", "result.json")))
    val = {int(k): v for k, v in result["val_losses"].items()}
    assert set(val) == {0, 20, 40}
    assert val[40] < 0.8 * val[0], f"validation loss did not fall clearly: {val}"

    # the stage chain: each stage's artifact, the resolved job, the start-up record
    data_art = json.load(open(os.path.join(run_dir, "data", "artifact.json")))
    model_art = json.load(open(os.path.join(run_dir, "train", "artifact.json")))
    resolved = json.load(open(os.path.join(run_dir, "resolved.json")))
    assert data_art["kind"] == "data" and data_art["context"] == resolved["context"] == 128
    assert model_art["kind"] == "model" and model_art["step"] == 40
    assert model_art["checkpoint"].endswith("train/checkpoints/step_000040")
    assert model_art["arch"]["n_layer"] == 4 and model_art["parent"] == data_art["uri"] + "/artifact.json"
    assert os.path.getsize(os.path.join(run_dir, "train", "model.safetensors")) > 4 * 800_000
    assert 0 < result["time_to_first_step_s"] < 900 and result["restarts"] == 0

    report = open(os.path.join(run_dir, "report.md")).read()
    assert "validation loss" in report and "perplexity" in report
    assert "## Data" in report and "## Training" in report and "first optimizer step" in report
    assert os.path.getsize(os.path.join(run_dir, "train", "loss.png")) > 5000
    # the input pipeline: its plot, a bottleneck verdict, each rank reading about half
    assert os.path.getsize(os.path.join(run_dir, "train", "input.png")) > 5000
    assert "input pipeline" in report and "rows read per data-parallel rank" in report
    ingest = result["ingest"]
    assert all(r <= 0.6 * ingest["split_rows"] for r in ingest["rows_read_by_rank"]), ingest


@pytest.mark.slow
def test_digits_mlp_through_the_same_loop(ray_session, repo_root, tmp_path):
    """Real images (scikit-learn's digits) through the same data stage and training loop."""
    cmd = [sys.executable, "-m", "bigopt.cli", "run", "jobs/digits_mlp.yaml",
           "--set", f"storage={tmp_path}", "--set", "train.max_steps=100"]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "digits-mlp" / "*"))
    manifest = json.load(open(os.path.join(run_dir, "data", "manifest.json")))
    assert manifest["rows_in"] == 1797 == manifest["rows_kept"] + manifest["rows_rejected"]
    assert sum(s["rows"] for s in manifest["splits"].values()) == manifest["rows_kept"]
    result = json.load(open(os.path.join(run_dir, "train", "result.json")))
    acc = {int(k): v for k, v in result["val_accuracy"].items()}
    assert acc[0] < 0.3 and acc[100] > 0.9, acc  # chance is 0.1; an MLP reaches ~0.95+
    assert "validation accuracy" in open(os.path.join(run_dir, "report.md")).read()
