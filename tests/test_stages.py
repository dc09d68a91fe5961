"""The stage table drives spec.stages(), the CLI, bigopt run's plan and the report."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bigopt.artifacts import DataArtifact, SplitInfo, read_artifact, write_artifact
from bigopt.cli import _parser
from bigopt.pipeline import parse_from, plan
from bigopt.resolve import resolve
from bigopt.runtime import RunDir
from bigopt.stages import STAGES, stage_names

from factories import make_spec


def test_spec_stages_follow_the_table_order():
    assert stage_names()[:3] == ["data", "search", "train"]  # DESIGN.md: data, search, train, ...
    assert make_spec().stages() == [s for s in stage_names() if s in ("data", "train")]
    assert make_spec(data=None).stages() == ["train"]


def test_cli_has_one_subcommand_per_stage():
    sub = next(a for a in _parser()._actions if a.dest == "command")
    assert {s.name for s in STAGES} <= set(sub.choices)
    for stage in STAGES:
        args = _parser().parse_args([stage.name, "x.yaml", "--from", "data=/r"])
        assert args.inputs_from == ["data=/r"]
        assert hasattr(args, "resume") == stage.resumable


def data_artifact(run: RunDir) -> DataArtifact:
    return DataArtifact(stage="data", run=run.uri, uri=run.uri_of("data"),
                        manifest=run.uri_of("data/manifest.json"), fingerprint="f" * 64,
                        task="language_model", columns=("input_ids", "labels"), context=32,
                        splits={"train": SplitInfo(uri=run.uri_of("data/train"), rows=10)})


def test_artifacts_round_trip_as_their_own_type(tmp_path):
    run = RunDir.create(str(tmp_path), "a")
    art = data_artifact(run)
    write_artifact(run.stage("data"), art)
    again = read_artifact(run, "data")
    assert isinstance(again, DataArtifact) and again == art
    with pytest.raises(FileNotFoundError, match="train/artifact.json"):
        read_artifact(run, "train")


def test_plan_takes_inputs_from_another_run_or_adds_their_stage(tmp_path):
    job = resolve(make_spec(tmp_path))
    prepared = RunDir.create(str(tmp_path), "prepared")
    write_artifact(prepared.stage("data"), data_artifact(prepared))
    fresh = RunDir.create(str(tmp_path), "fresh")
    # --from data=RUN: only train runs, on that run's artifact
    todo, given = plan(job, ["train"], run=fresh, inputs_from=parse_from([f"data={prepared.uri}"]))
    assert [s.name for s in todo] == ["train"] and given["data"].run == prepared.uri
    # ... also when every stage of the spec runs (`bigopt run --from data=RUN`)
    todo, _ = plan(job, None, run=fresh, inputs_from=parse_from([f"data={prepared.uri}"]))
    assert [s.name for s in todo] == ["train"]
    # a fresh run dir and a spec with a data section: the data stage is added
    todo, given = plan(job, ["train"], run=fresh, inputs_from={})
    assert [s.name for s in todo] == ["data", "train"] and not given
    # the run dir already holds the data artifact: it is used
    todo, given = plan(job, ["train"], run=prepared, inputs_from={})
    assert [s.name for s in todo] == ["train"] and given["data"].uri == prepared.uri_of("data")
    # no data section and nothing to take it from: an error that says what to do
    no_data = resolve(make_spec(tmp_path, data=None))
    with pytest.raises(ValueError, match="--from data=RUN_DIR"):
        plan(no_data, ["train"], run=fresh, inputs_from={})
    with pytest.raises(ValueError, match="STAGE=RUN_DIR"):
        parse_from(["data"])


def test_run_ids_do_not_collide_when_many_start_in_the_same_second(tmp_path):
    runs = {RunDir.create(str(tmp_path), "trials").uri for _ in range(500)}
    assert len(runs) == 500


def test_cli_unknown_preset_exits_2_naming_the_field(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: p\nmodel: {kind: gpt, preset: gpt2-124mm}\ntrain: {}\n")
    proc = subprocess.run([sys.executable, "-m", "bigopt.cli", "validate", str(spec)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("model.preset:"), proc.stderr
