"""The search section of a job spec: bad input exits 2 naming the field, before Ray starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from bigopt.spec import SpecError, parse_spec

from factories import spec_dict

DIGITS = {"data": {"source": {"kind": "digits", "path": None, "max_files": None}},
          "model": {"kind": "cnn", "image_size": 8, "n_layer": None, "n_head": None,
                    "d_model": None, "context": None}}


def searched(**search):
    return spec_dict(**DIGITS, search={"space": {"train.lr": {"loguniform": [1e-3, 1e-1]}}, **search})


def problems(raw) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return dict(info.value.problems)


def test_a_valid_search_spec_runs_data_search_train_in_order():
    assert parse_spec(searched(arch={"families": ["cnn", "mlp"]})).stages() == ["data", "search", "train"]


@pytest.mark.parametrize("search, field, words", [
    ({"arch": {"blocks": ["resnet", "inception"]}}, "search.arch.blocks.1", "resnet"),
    ({"arch": {"widths": []}}, "search.arch.widths", "at least 1"),
    ({"space": {"train.lr": {"choice": []}}}, "search.space.train.lr", "empty choice"),
    ({"space": {"train.lr": {"loguniform": [0, 1]}}}, "search.space.train.lr", "> 0"),
    ({"space": {"train.lrr": {"uniform": [0.1, 1]}}}, "search.space.train.lrr", "unknown key"),
    ({"space": {"train.batch_size": {"choice": [0, 8]}}}, "search.space.train.batch_size", "greater"),
    ({"arch": {"families": ["gpt"]}}, "search.arch.families", "cannot read"),
    ({"scheduler": {"kind": "pbt"}}, "search.searcher", "search.scheduler.kind pbt"),
    ({"searcher": "random", "num_trials": 1, "scheduler": {"kind": "pbt"}}, "search.num_trials",
     "search.scheduler.kind pbt"),
    ({"searcher": "random", "trial": {"train.max_steps": 40},
      "scheduler": {"kind": "pbt", "interval_steps": 50}}, "search.scheduler.interval_steps",
     "train.max_steps 40"),
    ({"searcher": "random", "space": {}, "arch": {"families": ["cnn"]},
      "scheduler": {"kind": "pbt"}}, "search.scheduler.mutate", "search.space"),
    ({"searcher": "random", "scheduler": {"kind": "pb2", "mutate": {
        "train.batch_size": {"choice": [16, 32]}}}}, "search.scheduler.mutate.train.batch_size",
     "search.scheduler.kind pb2"),
    ({"trial": {"data.split.val": 0.5}}, "search.space.data.split.val", "cluster, model and train"),
    ({"searcher": "bayes"}, "search.searcher", "evolution"),
    ({"num_trials": 20, "reevaluate": 0.1, "space": {"train.seed": {"choice": [0, 1]}}},
     "search.reevaluate", "search.space.train.seed"),
    ({"reevaluate": 1.0}, "search.reevaluate", "less than 1"),
    ({"evolution": {"crossover": 2}}, "search.evolution.crossover", "less than or equal"),
    ({"evolution": {"candidates": 4, "fresh": 4}}, "search.evolution.fresh", "must be a child"),
])
def test_bad_search_input_names_the_field(search, field, words):
    found = problems(searched(**search))
    assert field in found, found
    assert words in found[field], found[field]


def test_cli_validate_exits_2_naming_the_field(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(searched(arch={"blocks": ["transformer", "capsule"]})))
    out = subprocess.run([sys.executable, "-m", "bigopt.cli", "validate", str(spec)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "search.arch.blocks.1:" in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_cli_exits_2_naming_a_scheduler_and_the_setup_it_cannot_serve(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(searched(searcher="evolution", scheduler={"kind": "pb2"})))
    out = subprocess.run([sys.executable, "-m", "bigopt.cli", "validate", str(spec)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    line = next(x for x in (out.stdout + out.stderr).splitlines() if "search.searcher:" in x)
    assert "search.scheduler.kind pb2" in line and "Traceback" not in out.stderr
