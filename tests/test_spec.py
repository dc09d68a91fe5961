"""The job spec: typed, strict, overridable, and every problem reported with its field path."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from bigopt.spec import SpecError, apply_overrides, load_spec, parse_spec

from factories import BARE, spec_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = sorted(glob.glob(os.path.join(REPO, "jobs", "*.yaml")))


def minimal(**sections):
    return spec_dict(base=BARE, **sections)


def problems(raw) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return dict(info.value.problems)


@pytest.mark.parametrize("path", JOBS, ids=[os.path.basename(p) for p in JOBS])
def test_every_job_spec_validates(path):
    spec = load_spec(path)
    assert spec.stages(), f"{path} runs no stage"


def test_jobs_folder_has_the_quickstart():
    assert any(p.endswith("quickstart.yaml") for p in JOBS)


def test_unknown_keys_are_errors_with_their_path():
    found = problems(minimal(train={"zero": {"stage": 2, "stagee": 3}}, trian={}))
    assert "train.zero.stagee" in found and "unknown key" in found["train.zero.stagee"]
    assert "trian" in found


def test_every_problem_is_reported_not_just_the_first():
    found = problems(minimal(train={"zero": {"stage": 7}, "lr": -1, "batch_size": 0}))
    assert {"train.zero.stage", "train.lr", "train.batch_size"} <= set(found)


def test_model_union_errors_name_the_field_not_the_tag():
    found = problems(minimal(model={"kind": "gpt", "n_layer": 0}))
    assert "model.n_layer" in found


def test_cross_field_rules_name_the_field_to_change():
    found = problems(minimal(cluster={"num_workers": 2},
                             train={"pipeline": {"stages": 2}, "zero": {"stage": 3}}))
    assert "ZeRO 0 and 1" in found["train.zero.stage"]
    found = problems(minimal(cluster={"num_workers": 3}, train={"pipeline": {"stages": 2},
                                                                  "zero": {"stage": 1}}))
    assert "must divide" in found["train.pipeline.stages"]
    found = problems(minimal(train={"precision": "fp16"}))
    assert "auto or bf16" in found["train.precision"]
    found = problems(minimal(train={"zero": {"stage": 2, "offload_params": True}}))
    assert "train.zero.offload_params" in found
    found = problems(minimal(model={"kind": "gpt", "d_model": 100, "n_head": 3}))
    assert "model.n_head" in found


def test_missing_source_directory_fails_validation_not_the_run(tmp_path):
    found = problems(minimal(data={"source": {"path": str(tmp_path / "nope")}}))
    assert "is not a directory" in found["data.source.path"]
    assert parse_spec(minimal(data={"source": {"path": str(tmp_path)}})).data.source.path == str(tmp_path)


def test_overrides_parse_yaml_values_and_create_sections():
    raw = apply_overrides({"name": "x", "train": {"zero": {"stage": 2}}},
                          ["train.zero.stage=3", "train.precision=fp32", "cluster.num_workers=4",
                           "data.source.include=[a.py, b.py]", "cluster.address=null"])
    assert raw["train"]["zero"]["stage"] == 3
    assert raw["cluster"] == {"num_workers": 4, "address": None}
    assert raw["data"]["source"]["include"] == ["a.py", "b.py"]


def test_override_precedence_over_yaml(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: a\nmodel: {kind: gpt}\ntrain: {max_steps: 300}\n")
    assert load_spec(path, ["train.max_steps=20"]).train.max_steps == 20
    assert load_spec(path).train.max_steps == 300


def test_quickstart_design_md_example_means_what_it_says():
    spec = load_spec(os.path.join(REPO, "jobs", "quickstart.yaml"),
                     ["train.max_steps=20", "train.zero.stage=3", "train.precision=fp32",
                      "cluster.num_workers=2", "train.schedule.warmup_steps=5"])
    assert (spec.train.max_steps, spec.train.zero.stage, spec.train.precision) == (20, 3, "fp32")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "bigopt.cli", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=60)


def test_cli_validate_exit_codes_and_one_line_per_problem():
    ok = run_cli("validate", "jobs/quickstart.yaml")
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("validate", "jobs/quickstart.yaml", "--set", "train.zero.stage=7",
                  "--set", "train.lrr=1")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert lines[0].startswith("train.zero.stage: ") and lines[1].startswith("train.lrr: ")
    assert len(lines) == 2


def test_validate_does_not_start_ray(tmp_path):
    # An invalid spec fails before Ray starts: no Ray session dir appears for this process.
    before = set(glob.glob("/tmp/ray/session_*"))
    bad = run_cli("run", "jobs/quickstart.yaml", "--set", "train.zero.stage=9")
    assert bad.returncode == 2 and "train.zero.stage" in bad.stderr
    assert set(glob.glob("/tmp/ray/session_*")) == before


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    assert "file not found" in str(pytest.raises(SpecError, load_spec, tmp_path / "no.yaml").value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert "not valid YAML" in str(pytest.raises(SpecError, load_spec, bad).value)
