"""The compress stage through the CLI, as users run it: real Ray Train fine-tuning on real data
(digits, the stdlib corpus), each variant a loadable, measured model artifact with lineage."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from factories import cli_validate, run_cli, spec_dict

DIGITS_CHAIN = {
    "name": "chain",
    "cluster": {"num_workers": 2},
    "data": {"source": {"kind": "digits"}, "split": {"val": 0.2, "test": 0.2}},
    "model": {"kind": "mlp", "in_features": 64, "hidden": [128, 64], "num_classes": 10},
    # DDP: DeepSpeed's bf16 engine casts weights but not float image inputs (jobs/fmnist_cnn.yaml)
    "train": {"strategy": "ddp", "batch_size": 32, "max_steps": 120, "lr": 3e-3, "eval_every": 60,
              "eval_batches": 4, "checkpoint_every": 0, "log_every": 10},
    "compress": {"eval_rows": 400, "latency_repeats": 5, "steps": [
        {"kind": "prune", "method": "structured", "ratio": 0.5, "steps": 40},
        {"kind": "distill", "student": {"kind": "mlp", "in_features": 64, "hidden": [32],
                                        "num_classes": 10}, "steps": 150, "lr": 1e-2, "temperature": 4.0},
        # L1-regularised fine-tuning, then the smallest half of the weights set to zero
        {"kind": "prune", "method": "l1", "sparsity": 0.5, "steps": 20, "l1_weight": 1e-4},
        {"kind": "quantize", "mode": "qat", "steps": 20}]},
    "export": {"formats": ["onnx", "onnx_int8", "pte"], "eval_rows": 200, "latency_repeats": 3,
               "variants": ["02-distill"], "budget": {"max_bytes": 8000}},
}


@pytest.mark.slow
def test_prune_distill_qat_chain_and_export_on_digits(ray_session, repo_root, tmp_path):
    proc, run = run_cli(repo_root, DIGITS_CHAIN, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.load(open(os.path.join(run, "compress", "summary.json")))
    rows = {r["variant"]: r for r in summary["rows"]}
    assert list(rows) == ["input", "01-prune", "02-distill", "03-prune", "04-quantize"]
    # structured pruning removed half the hidden neurons: a physically smaller model
    arts = {v: json.load(open(os.path.join(run, "compress", v, "artifact.json"))) for v in list(rows)[1:]}
    assert arts["01-prune"]["arch"]["hidden"] == [64, 32]
    assert rows["01-prune"]["params"] < 0.55 * rows["input"]["params"]
    assert rows["01-prune"]["size_bytes"] < 0.55 * rows["input"]["size_bytes"]
    # the distilled student is the architecture asked for, trained by the teacher
    assert arts["02-distill"]["arch"]["hidden"] == [32]
    # int8 (QAT converted) is smaller on disk than the fp32 student it came from
    assert rows["04-quantize"]["size_bytes"] < rows["02-distill"]["size_bytes"]
    # every variant still classifies digits far above chance (0.1), on the same test rows
    assert summary["eval_split"] == "test" and summary["eval_rows"] > 300
    for name, row in rows.items():
        assert row["metrics"]["accuracy"] > 0.6, (name, row["metrics"])
    # lineage: each variant names the one it came from, the first names train's model
    assert arts["01-prune"]["parent"] == os.path.join(run, "train", "artifact.json")
    assert arts["02-distill"]["parent"] == os.path.join(run, "compress", "01-prune", "artifact.json")
    stage_art = json.load(open(os.path.join(run, "compress", "artifact.json")))
    assert stage_art["variant"] == "04-quantize" and len(stage_art["variants"]) == 4
    # L1 + magnitude pruning zeroed half the student's weights; QAT fine-tuning kept them zero
    prunable = 64 * 32 + 32 * 10
    assert rows["03-prune"]["nonzero_params"] <= rows["02-distill"]["nonzero_params"] - prunable // 2
    assert rows["04-quantize"]["nonzero_params"] == rows["03-prune"]["nonzero_params"]
    # each variant loads anywhere; its recorded quantization is applied on load
    import bigopt
    from bigopt.compress.quantize import quantized_layers

    model = bigopt.load_model(os.path.join(run, "compress", "04-quantize"))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears and quantized_layers(model) == linears
    report = open(os.path.join(run, "report.md")).read()
    assert "## Compression" in report and "| 02-distill |" in report
    assert os.path.getsize(os.path.join(run, "compress", "tradeoff.png")) > 5000
    # export: each file with its card, measured by its own runtime; the budget picks the int8 file
    export = json.load(open(os.path.join(run, "export", "summary.json")))
    files = {r["format"]: r for r in export["rows"]}
    assert set(files) == {"onnx", "onnx_int8", "pte"} and not any("error" in r for r in files.values())
    for fmt, r in files.items():
        card = json.load(open(os.path.join(os.path.dirname(r["file"]), "model_card.json")))
        assert card["inputs"][0]["shape"][0] == "batch" and card["labels"][:2] == ["0", "1"]
        assert abs(card["metrics"]["values"]["accuracy"] - r["pytorch"]["accuracy"]) <= 0.02, fmt
    assert export["chosen"]["format"] == "onnx_int8" and export["chosen"]["bytes"] <= 8000
    assert "To ship" in report and "## Export" in report
    # an export whose runtime differs from PyTorch beyond export.atol fails, naming the
    # difference, and keeps nothing of the failed file
    path = tmp_path / "strict.yaml"
    path.write_text(yaml.safe_dump(DIGITS_CHAIN))
    strict = tmp_path / "strict"
    proc = subprocess.run([sys.executable, "-m", "bigopt.cli", "export", str(path),
                           "--set", f"storage={strict}", "--set", "export.atol=1e-12",
                           "--from", f"compress={run}"], cwd=repo_root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0 and "max abs diff" in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert not glob.glob(str(strict / "*" / "*" / "export" / "*" / "*" / "model.onnx"))


@pytest.mark.slow
def test_magnitude_masks_survive_optimizer_steps_under_zero3(ray_session, repo_root, tmp_path):
    """Gradual magnitude pruning of the GPT under DeepSpeed ZeRO-3 with the user's default
    precision (auto: bf16 on CPU): the optimizer moves pruned weights off zero every step
    (``regrown``), the masks put them back before every forward, and the saved weights hold
    exactly the final masks' zeros. Then a token-level distilled student (ZeRO-3 student, a
    full frozen teacher on each rank) and int8 weight-only PTQ, with their perplexities."""
    spec = spec_dict(name="zero3prune", train={"precision": "auto", "zero": {"stage": 3},
                                               "max_steps": 10, "checkpoint_every": 0},
                     compress={"eval_rows": 64, "latency_repeats": 3, "steps": [
                         {"kind": "prune", "method": "magnitude", "sparsity": 0.8, "steps": 20,
                          "ramp": 0.5, "frequency": 5, "lr": 1e-3},
                         # token-level distillation: a 1-layer student of the pruned teacher
                         {"kind": "distill", "steps": 20, "lr": 3e-3,
                          "student": {"kind": "gpt", "n_layer": 1, "n_head": 2, "d_model": 32,
                                      "context": 32}},
                         {"kind": "quantize", "mode": "int8_weight_only"}]})
    proc, run = run_cli(repo_root, spec, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    variant = os.path.join(run, "compress", "01-prune")
    result = json.load(open(os.path.join(variant, "result.json")))
    assert result["precision"] == "bf16" and result["deepspeed_config"]["zero_optimization"]["stage"] == 3
    rows = [json.loads(line) for line in open(os.path.join(variant, "metrics.jsonl"))]
    after_ramp = [r for r in rows if r["step"] >= 10]
    assert after_ramp and all(r["sparsity_target"] == pytest.approx(0.8) for r in after_ramp)
    assert all(r["sparsity_forward"] >= 0.8 - 1e-3 for r in after_ramp), after_ramp
    assert any(r["regrown"] > 0 for r in after_ramp), "the optimizer never moved a pruned weight"
    from safetensors.torch import load_file

    from bigopt.compress.prune import prunable_weights
    from bigopt.models import from_arch

    state = load_file(os.path.join(variant, "model.safetensors"))
    names = prunable_weights(from_arch(json.load(open(os.path.join(variant, "artifact.json")))["arch"]))
    total = sum(state[n].numel() for n in names)
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    assert zeros / total >= 0.8 - 1e-3
    rows = json.load(open(os.path.join(run, "compress", "summary.json")))["rows"]
    assert [r["variant"] for r in rows] == ["input", "01-prune", "02-distill", "03-quantize"]
    ppl = [r["metrics"]["perplexity"] for r in rows]
    assert all(1 < p < 256 for p in ppl), ppl  # below the uniform guess over 256 byte values
    student = json.load(open(os.path.join(run, "compress", "02-distill", "artifact.json")))
    assert student["arch"]["n_layer"] == 1 and rows[2]["params"] < rows[1]["params"]
    assert abs(ppl[3] - ppl[2]) < 0.05 * ppl[2], ppl  # int8 weights: a small change
    # int8 Linear weights; the token and position embeddings stay fp32 (torchao quantizes
    # Linear layers), a large share of so small a GPT
    assert rows[3]["size_bytes"] < 0.6 * rows[2]["size_bytes"]


def test_bad_compress_fields_exit_2_naming_the_field(tmp_path, repo_root):
    rc, fields, err = cli_validate(repo_root, tmp_path, spec_dict(str(tmp_path), compress={"steps": [
        {"kind": "prune", "sparsity": 1.0}, {"kind": "distill", "temperature": 0}]}))
    assert rc == 2 and {"compress.steps.0.sparsity", "compress.steps.1.temperature"} <= fields, err
    # a quantization the backend cannot run on this engine: torchao QAT on ZeRO-3 shards
    rc, fields, err = cli_validate(repo_root, tmp_path, spec_dict(
        str(tmp_path), train={"zero": {"stage": 3}},
        compress={"steps": [{"kind": "quantize", "mode": "qat", "steps": 10}]}))
    assert rc == 2 and fields == {"compress.steps.0.mode"}, err


def test_a_model_whose_architecture_does_not_match_exits_2_before_ray(tmp_path, repo_root):
    """``bigopt compress --from train=RUN``: the other run's model is not the spec's model."""
    from bigopt.artifacts import DataArtifact, ModelArtifact, SplitInfo, write_artifact
    from bigopt.runtime import RunDir

    other = RunDir.create(str(tmp_path / "other"), "t", run_id="r")
    data = DataArtifact(stage="data", run=other.uri, uri=other.uri_of("data"),
                        manifest=other.uri_of("data/manifest.json"), fingerprint="f" * 64,
                        task="language_model", columns=("input_ids", "labels"), context=32,
                        splits={"train": SplitInfo(uri=other.uri_of("data/train"), rows=10)})
    write_artifact(other.stage("data"), data)
    write_artifact(other.stage("train"), ModelArtifact(
        stage="train", run=other.uri, uri=other.uri_of("train"), task="language_model",
        arch={"kind": "gpt", "n_layer": 6, "n_head": 2, "d_model": 32, "context": 32,
              "vocab_size": 256, "dropout": 0.0}, format="none", step=1,
        parent=data.artifact_uri, weights=other.uri_of("train/model.safetensors")))
    spec = spec_dict(str(tmp_path / "runs"), compress={"steps": [{"kind": "quantize"}]})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, "-m", "bigopt.cli", "compress", str(path),
                           "--from", f"train={other.uri}"], cwd=repo_root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("model: ") and "n_layer=6" in proc.stderr, proc.stderr
    assert "n_layer=2" in proc.stderr
