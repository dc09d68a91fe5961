"""The trainer outside Ray Train: in one process, with hooks, and inside Ray Tune trials.

Real Ray Data (the session Ray), real engines, real digits data prepared once per module.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import bigopt
from bigopt.artifacts import read_artifact
from bigopt.resolve import resolve
from bigopt.runtime import RunDir
from bigopt.train.hooks import TrainHooks
from bigopt.train.reporting import LocalReporter
from bigopt.train.trial import train_in_process, tune_trainable
from bigopt.train.weights import load_trained_model

from factories import make_spec

pytestmark = pytest.mark.slow

DIGITS = {"data": {"source": {"kind": "digits", "path": None, "max_files": None},
                   "split": {"val": 0.2}},
          "model": {"kind": "mlp", "n_layer": None, "n_head": None, "d_model": None,
                    "context": None, "in_features": 64, "hidden": [64]},
          "cluster": {"num_workers": 1}}


def digits_spec(storage, **train):
    return make_spec(storage, name="digits", **DIGITS,
                     train={"strategy": "ddp", "lr": 1e-2, "batch_size": 32,
                            "max_steps": 30, "eval_every": 10, "checkpoint_every": 0, **train})


@pytest.fixture(scope="module")
def digits(ray_session, tmp_path_factory):
    storage = tmp_path_factory.mktemp("trial")
    run = RunDir(bigopt.run(digits_spec(storage), stages=["data"]).run_uri)
    return storage, read_artifact(run, "data")


def keep_first_half(model):
    """A pruning-like transform: zero the first half of the first layer's input weights."""
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        first.weight[:, :32] = 0
    return model


def reapply_mask(model, step):
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        first.weight[:, :32] = 0
    calls.append(step)


calls: list[int] = []


def test_in_process_trainer_with_model_transform_and_step_callback(digits):
    storage, data = digits
    job = resolve(digits_spec(storage))
    out = RunDir.create(str(storage), "in-process").stage("train")
    calls.clear()
    reporter = LocalReporter(out)
    artifact = train_in_process(job, data, out, reporter, hooks=TrainHooks(
        model_transforms=(keep_first_half,), step_callbacks=(reapply_mask,)))
    assert calls == list(range(1, 31))  # after every optimizer step
    assert artifact.step == 30 and artifact.checkpoint == out.uri_of("checkpoints/step_000030")
    # validation metrics reached the reporter at every eval, not only with the checkpoint
    evals = [r for r in reporter.reported if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30] and all("val_acc" in r for r in evals)
    model = load_trained_model(artifact.arch, out.sub("checkpoints/step_000030"))
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert torch.all(first.weight[:, :32] == 0) and torch.any(first.weight[:, 32:] != 0)
    assert evals[-1]["val_acc"] > 0.4  # half the pixels still classify digits (chance: 0.1)


def test_teacher_loss_builder_sees_the_teachers_output(digits):
    storage, data = digits
    job = resolve(digits_spec(storage, max_steps=10))
    seen = []

    def teacher():
        from bigopt.models import MLP

        torch.manual_seed(123)
        return MLP(in_features=64, hidden=[32], num_classes=10)

    def builder(base_loss):
        def loss(output, target, teacher_output):
            seen.append(tuple(teacher_output.shape))
            soft = torch.nn.functional.kl_div(output.log_softmax(-1), teacher_output.softmax(-1),
                                              reduction="batchmean")
            return 0.5 * base_loss(output, target) + 0.5 * soft
        return loss

    out = RunDir.create(str(storage), "teacher").stage("train")
    plain = RunDir.create(str(storage), "plain").stage("train")
    train_in_process(job, data, out, LocalReporter(out),
                     hooks=TrainHooks(teacher=teacher, loss_builder=builder))
    train_in_process(job, data, plain, LocalReporter(plain))
    assert seen and all(s == (32, 10) for s in seen)
    losses = [r["loss"] for r in out.read_jsonl("metrics.jsonl")]
    plain_losses = [r["loss"] for r in plain.read_jsonl("metrics.jsonl")]
    assert losses != plain_losses  # the teacher term changed the objective


def test_tune_trials_run_the_trainer_and_see_every_eval(digits):
    from ray import tune

    storage, data = digits
    spec = digits_spec(storage, strategy="deepspeed", zero={"stage": 0})
    tuner = tune.Tuner(
        tune.with_resources(tune_trainable(spec, data), {"CPU": 1}),
        param_space={"train.lr": tune.grid_search([1e-3, 1e-2])},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(storage / "tune"), name="lr"))
    results = tuner.fit()
    assert not results.errors
    run_dirs = set()
    for result in results:
        frame = result.metrics_dataframe
        assert list(frame.dropna(subset=["val_loss"])["step"]) == [10, 20, 30]
        assert result.checkpoint is not None
    trial_runs = sorted((storage / "digits-trials").iterdir())
    run_dirs = {p.name for p in trial_runs}
    assert len(run_dirs) == 2
    for run in trial_runs:
        assert (run / "resolved.json").is_file() and (run / "train" / "result.json").is_file()
    lrs = sorted(resolve_lr(run) for run in trial_runs)
    assert lrs == [1e-3, 1e-2]
    best = results.get_best_result()
    assert best.metrics["val_loss"] == min(r.metrics["val_loss"] for r in results)


def resolve_lr(run) -> float:
    from bigopt.resolve import ResolvedJob

    return ResolvedJob.loads((run / "resolved.json").read_text()).spec.train.lr


def test_a_large_trial_runs_a_torchtrainer_inside_the_trial(digits):
    """cluster.num_workers > 1: the trial starts a TorchTrainer of its own; its reports (every
    eval's val_loss) reach Tune through Ray's TuneReportCallback."""
    from ray import tune

    storage, data = digits
    spec = make_spec(storage, name="big", **{**DIGITS, "cluster": {"num_workers": 2}},
                     train={"strategy": "deepspeed", "zero": {"stage": 2}, "lr": 1e-2,
                            "batch_size": 16, "max_steps": 20, "eval_every": 10,
                            "checkpoint_every": 0})
    tuner = tune.Tuner(
        # 1 CPU for the trial (it waits on its TorchTrainer) + 2 for the trainer's workers: the
        # session Ray's 3
        tune.with_resources(tune_trainable(spec, data), {"CPU": 1}),
        param_space={"train.lr": tune.grid_search([1e-2])},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min"),
        run_config=tune.RunConfig(storage_path=str(storage / "tune"), name="big"))
    results = tuner.fit()
    assert not results.errors, results.errors
    (result,) = list(results)
    assert list(result.metrics_dataframe.dropna(subset=["val_loss"])["step"]) == [10, 20]
    (run,) = (storage / "big-trials").iterdir()
    final = json.loads((run / "train" / "result.json").read_text())
    assert final["layout"]["world_size"] == 2 and final["artifact"]["step"] == 20
    shards = os.listdir(run / "train" / "checkpoints" / "step_000020" / "state")
    assert any("zero_pp_rank_1" in s for s in shards)  # both ranks' ZeRO shards
