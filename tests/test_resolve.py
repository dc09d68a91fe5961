"""resolve(spec): every derived decision made once, preset-aware, written as resolved.json."""

from __future__ import annotations

import pytest

from bigopt.models import GPT_PRESETS as MODEL_PRESETS
from bigopt.models import from_arch
from bigopt.presets import GPT_PRESETS
from bigopt.resolve import ResolvedJob, resolve
from bigopt.spec import SpecError, parse_spec

from factories import BARE, TINY, make_spec, spec_dict


def test_a_preset_alone_resolves_to_the_presets_context_and_shape():
    job = resolve(make_spec(model={"kind": "gpt", "preset": "gpt2-124m", "n_layer": None,
                                   "n_head": None, "d_model": None, "context": None}))
    assert job.context == 1024
    assert {k: job.arch[k] for k in GPT_PRESETS["gpt2-124m"]} == GPT_PRESETS["gpt2-124m"]
    # explicit fields still override the preset
    job = resolve(make_spec(model={"kind": "gpt", "preset": "gpt2-124m", "n_layer": 2,
                                   "n_head": None, "d_model": None, "context": 64}))
    assert job.context == 64 and job.arch["n_layer"] == 2 and job.arch["d_model"] == 768


def test_an_unknown_preset_names_model_preset():
    with pytest.raises(SpecError) as info:
        parse_spec(spec_dict(base=BARE, model={"kind": "gpt", "preset": "gpt2-124mm"}))
    assert "model.preset" in dict(info.value.problems)


def test_one_preset_table():
    assert MODEL_PRESETS is GPT_PRESETS


def test_task_columns_and_architecture_come_from_the_model_kind():
    lm = resolve(make_spec())
    assert (lm.task, lm.columns) == ("language_model", ("input_ids", "labels"))
    model = from_arch(lm.arch)
    assert model.context == 32 and model.n_layer == 2
    clf = resolve(make_spec(data={"source": {"kind": "digits", "path": None, "max_files": None}},
                            model={"kind": "mlp", "n_layer": None, "n_head": None, "d_model": None,
                                   "context": None, "in_features": 64}))
    assert (clf.task, clf.columns, clf.context) == ("classifier", ("inputs", "labels"), None)


def test_layout_data_order_precision_and_deepspeed_config_are_resolved():
    job = resolve(make_spec(train={"precision": "auto"}))
    assert job.precision == "bf16" and job.spec.train.precision == "bf16"  # recorded
    assert job.data_order == "deterministic" and job.layout.dp == 2  # reproducible by default
    assert resolve(make_spec(train={"data_order": "streaming"})).data_order == "streaming"
    assert job.deepspeed_config["train_batch_size"] == 4 * 2
    pp = resolve(make_spec(train={"pipeline": {"stages": 2}}))
    assert pp.data_order == "deterministic" and pp.layout.dp == 1
    assert resolve(make_spec(train={"strategy": "ddp"})).deepspeed_config is None


def test_the_pipeline_zero_rule_lives_in_one_place():
    with pytest.raises(SpecError) as info:
        make_spec(train={"pipeline": {"stages": 2}, "zero": {"stage": 2}})
    assert "ZeRO 0 and 1" in dict(info.value.problems)["train.zero.stage"]


def test_resolved_job_round_trips_through_json():
    job = resolve(make_spec())
    again = ResolvedJob.loads(job.dumps())
    assert again == job and again.spec == job.spec


def test_data_only_spec_resolves_its_task_from_the_source():
    raw = {k: v for k, v in TINY.items() if k in ("name", "data")}
    with pytest.raises(SpecError, match="data.context"):
        parse_spec(raw)
    job = resolve(parse_spec({**raw, "data": {**raw["data"], "context": 64}}))
    assert job.stages == ["data"] and job.task == "language_model" and job.context == 64


def test_a_run_that_checkpoints_survives_failures_by_default():
    assert resolve(make_spec(train={"checkpoint_every": 10})).max_failures == 3
    assert resolve(make_spec(train={"checkpoint_every": 0})).max_failures == 0
    assert resolve(make_spec(train={"checkpoint_every": 10, "max_failures": 0})).max_failures == 0
