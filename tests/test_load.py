"""bigopt.load_model: a model artifact rebuilt from its arch dict and model.safetensors, with
clear errors for what is missing or does not fit, and no DeepSpeed or pickle on the way."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bigopt.artifacts import ModelArtifact, write_artifact
from bigopt.load import load_model
from bigopt.models import build_model
from bigopt.runtime import RunDir
from bigopt.train.weights import write_weights

ARCH = {"kind": "mlp", "in_features": 8, "hidden": [16], "num_classes": 3}


def saved_model(tmp_path, state=None) -> tuple[RunDir, torch.nn.Module]:
    run = RunDir.create(str(tmp_path), "m", run_id="r")
    out = run.stage("train")
    torch.manual_seed(1)
    model = build_model(**ARCH)
    weights = write_weights(out, state if state is not None else model.state_dict())
    write_artifact(out, ModelArtifact(stage="train", run=run.uri, uri=out.uri, task="classifier",
                                      arch=ARCH, format="none", step=0, weights=weights))
    return run, model


def test_round_trip_from_a_run_dir_a_stage_folder_or_an_artifact_file(tmp_path):
    run, model = saved_model(tmp_path)
    x = torch.randn(4, 8)
    for where in (run.uri, run.uri_of("train"), run.uri_of("train/artifact.json")):
        again = load_model(where)
        assert torch.equal(again(x), model.eval()(x))


def test_loads_with_deepspeed_and_pickle_unavailable(tmp_path):
    run, _ = saved_model(tmp_path)
    code = ("import sys, pickle; sys.modules['deepspeed'] = None\n"
            "def refuse(*a, **k): raise RuntimeError('unpickled')\n"
            "pickle.loads = pickle.load = refuse\n"
            f"import bigopt; m = bigopt.load_model({run.uri!r}); print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "MLP"


def test_a_directory_without_a_model_says_what_is_missing_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model artifact at .*train/artifact.json"):
        load_model(str(tmp_path))


def test_a_shape_mismatch_names_the_first_mismatching_tensor(tmp_path):
    wrong = build_model(**{**ARCH, "hidden": [12]}).state_dict()
    run, _ = saved_model(tmp_path, state=wrong)
    with pytest.raises(ValueError, match=r"tensor 'stack.0.1.weight' has shape \(12, 8\), the "
                                         r"architecture expects \(16, 8\)"):
        load_model(run.uri)
