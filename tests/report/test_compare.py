"""report.md's "Compared with" section (``report.compare_with``): which run a job name
finds, what the section says about the difference and the data, and what it says when the
reference has not run yet. A real two-run comparison through the CLI is in
tests/test_reproducible.py."""

from __future__ import annotations

import pytest

from bigopt.report.compare import compare_with, comparison_section, find_reference, timing_record

from factories import cli_validate, finished_run, spec_dict


def test_a_job_name_finds_its_newest_finished_run_and_the_report_gives_the_difference(tmp_path):
    old = finished_run(tmp_path, "hand", "20261201-000000-aaaaaaaa", metrics={"test_accuracy": 0.95})
    new = finished_run(tmp_path, "hand", "20261202-000000-bbbbbbbb",
                       metrics={"test_accuracy": 0.9200, "test_loss": 0.25}, params=73082, wall_s=185)
    finished_run(tmp_path, "hand", "20261203-000000-cccccccc", metrics=None)  # cut short
    this = finished_run(tmp_path, "search", "20261204-000000-dddddddd",
                        metrics={"test_accuracy": 0.9266, "test_loss": 0.22}, params=99898, wall_s=306)

    assert find_reference(this, "hand").uri == new.uri != old.uri
    text = "\n".join(comparison_section(this, ["hand"]))
    assert "**test accuracy 92.66 % against hand's 92.00 %: +0.66 points** (this run is ahead)" in text
    assert "on the same prepared data" in text
    assert f"| hand `{new.name}` | 92.00 % | 0.2500 | 73,082 | 100 | 185 s (data 1, train 184) |" in text
    assert f"| search `{this.name}` (this run) | 92.66 % | 0.2200 | 99,898 |" in text


def test_a_run_of_the_same_job_is_compared_with_the_one_before_never_itself(tmp_path):
    before = finished_run(tmp_path, "job", "20261201-000000-aaaaaaaa", metrics={"val_loss": 1.5})
    this = finished_run(tmp_path, "job", "20261202-000000-bbbbbbbb", metrics={"val_loss": 1.75})
    assert find_reference(this, "job").uri == before.uri
    text = "\n".join(comparison_section(this, ["job"]))
    # a loss: lower is better, so the reference leads
    assert "**validation loss 1.7500 against job's 1.5000: +0.2500** (job is ahead)" in text


def test_other_data_and_a_run_dir_reference_are_named(tmp_path):
    other = finished_run(tmp_path / "elsewhere", "hand", "20261201-000000-aaaaaaaa",
                         metrics={"test_accuracy": 0.9}, fingerprint="a" * 64)
    this = finished_run(tmp_path, "search", "20261202-000000-bbbbbbbb",
                        metrics={"test_accuracy": 0.9}, fingerprint="b" * 64)
    text = "\n".join(comparison_section(this, [other.uri]))
    assert "+0.00 points** (level)" in text
    assert f"**on different data** (fingerprints `{'b' * 12}` and `{'a' * 12}`)" in text


def test_a_reference_that_has_not_run_says_how_to_add_it(tmp_path):
    this = finished_run(tmp_path, "search", "20261202-000000-bbbbbbbb", metrics={"test_accuracy": 0.9})
    text = "\n".join(comparison_section(this, ["hand"]))
    assert f"`hand`: no run with a trained model at `{tmp_path}/hand` yet" in text
    assert f"`bigopt report {this.uri}` adds it here" in text
    assert "| run |" not in text
    # no train artifact in this run: nothing to compare
    cut = finished_run(tmp_path, "search", "20261203-000000-cccccccc", metrics=None)
    assert comparison_section(cut, ["hand"]) == []


def test_the_references_come_from_the_recorded_spec(tmp_path):
    run = finished_run(tmp_path, "search", "20261202-000000-bbbbbbbb", metrics={"val_acc": 0.5},
                       report={"compare_with": ["hand", "/runs/hand/20261201-000000-aaaaaaaa"]})
    assert compare_with(run) == ["hand", "/runs/hand/20261201-000000-aaaaaaaa"]
    assert compare_with(finished_run(tmp_path, "plain", "x", metrics=None)) == []


def test_run_json_sums_wall_time_over_resumed_invocations():
    first = timing_record(None, 100.0, {"data": 10.0, "train": 80.0})
    again = timing_record(first, 50.0, {"train": 45.0})
    assert again == {"wall_s": 150.0, "stage_s": {"data": 10.0, "train": 45.0}}


@pytest.mark.parametrize("bad", ["not a name!", ""])
def test_a_bad_reference_fails_validation_naming_the_field(repo_root, tmp_path, bad):
    code, fields, err = cli_validate(repo_root, tmp_path, spec_dict(report={"compare_with": [bad]}))
    assert code == 2 and "report.compare_with" in fields, err
