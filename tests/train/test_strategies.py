"""Every strategy trains the same model the same way (fp32, fixed seed, same data order).

fp32 here is not the user's default (auto: bf16 on CPU): the equivalence checks compare
strategies to 1e-4..1e-6, and bf16 rounds differently in each (DeepSpeed keeps bf16 weights,
ddp autocasts fp32 ones). What must hold under the default, resuming exactly, runs in both.

Real Ray Train workers, real DeepSpeed engines, real stdlib data. The runs are shared between
tests through a module-scoped cache, because each costs ~20-30 s of start-up on 2 cores.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch

import bigopt
from bigopt.resolve import resolve
from bigopt.runtime import RunDir
from bigopt.train.weights import load_trained_model

from factories import make_spec

pytestmark = pytest.mark.slow

STEPS = 20


def tiny_spec(storage: str, *, workers: int = 2, dropout: float = 0.0, precision: str = "fp32",
              **train) -> bigopt.JobSpec:
    return make_spec(
        storage, name="strategies",
        cluster={"num_workers": workers, "cpus_per_worker": 2 / workers if workers > 2 else 1},
        model={"dropout": dropout},
        train={"max_steps": STEPS, "lr": 3e-3, "clip_grad": 1.0, "precision": precision,
               "schedule": {"kind": "cosine", "warmup_steps": 3}, "checkpoint_at": [1],
               "keep_last": 3, **train})  # the default data order: seeded, shuffled


class Runs:
    """Runs each distinct training configuration once per module, on shared prepared data."""

    def __init__(self, storage: str):
        self.storage, self.cache = storage, {}
        spec = tiny_spec(storage)
        self.data = bigopt.run(spec, stages=["data"]).run_uri

    def get(self, key: str, *, workers: int = 2, resume: str | None = None, dropout: float = 0.0,
            **train) -> RunDir:
        if key not in self.cache:
            spec = tiny_spec(self.storage, workers=workers, dropout=dropout, **train)
            # trust_checkpoint: the resumed checkpoints are this module's own runs (another run
            # dir, which the CLI refuses without --trust-checkpoint: DeepSpeed unpickles them)
            result = bigopt.run(spec, stages=["train"], inputs_from={"data": self.data}, resume=resume,
                                trust_checkpoint=resume is not None)
            self.cache[key] = (spec, RunDir(result.run_uri))
        return self.cache[key]

    @staticmethod
    def losses(run: RunDir) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in run.read_jsonl("train/metrics.jsonl")}


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    return Runs(str(tmp_path_factory.mktemp("strategies")))


def params_at(spec, run: RunDir, step: int) -> list[torch.Tensor]:
    model = load_trained_model(resolve(spec).arch, run.sub(f"train/checkpoints/step_{step:06d}"))
    return [p.detach() for p in model.parameters()]


def assert_rel_close(a: list[torch.Tensor], b: list[torch.Tensor], rel: float) -> None:
    num = sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True)) ** 0.5
    den = sum((x**2).sum() for x in a) ** 0.5
    assert num / den < rel, f"relative difference {float(num / den):.3g} >= {rel}"


def assert_trajectories_close(a: dict[int, float], b: dict[int, float], rel: float) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    assert worst < rel, f"worst relative loss difference {worst:.3g} >= {rel}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_zero0(runs, stage):
    _, base = runs.get("zero0")
    _, run = runs.get(f"zero{stage}", zero={"stage": stage}, checkpoint_every=0)
    losses, ref = runs.losses(run), runs.losses(base)
    assert_trajectories_close(ref, losses, 1e-4)
    assert ref[STEPS] < 0.8 * ref[1]  # and it is actually learning
    # ... and the stage took effect: ZeRO-3 leaves each of the 2 ranks about half the params
    engine = run.read_json("train/result.json")["engine"]
    assert run.read_json("train/result.json")["deepspeed_config"]["zero_optimization"]["stage"] == stage
    if stage == 3:
        assert 0.45 < engine["params_held"] / engine["params_total"] < 0.55, engine
    else:
        assert engine["params_held"] == engine["params_total"], engine


# One-step parameter checks use SGD: Adam's first update is ~lr*g/|g|, which turns the
# reduction-order rounding between strategies (~1e-7) into sign flips on near-zero gradients.
SGD = {"optimizer": "sgd", "lr": 0.1}


def test_ddp_matches_zero0_after_one_step_and_over_twenty(runs):
    spec, base = runs.get("zero0-sgd", **SGD)
    ddp_spec, ddp = runs.get("ddp-sgd", strategy="ddp", **SGD)
    assert_rel_close(params_at(spec, base, 1), params_at(ddp_spec, ddp, 1), 1e-6)
    assert_trajectories_close(runs.losses(base), runs.losses(ddp), 1e-2)
    assert runs.losses(ddp)[STEPS] < 0.9 * runs.losses(ddp)[1]


def test_pipeline_matches_data_parallel(runs):
    # 2 pipeline stages x 1 data rank, 2 micro-batches of 4 == 1 data rank, 2 accumulated
    # micro-batches of 4: the same rows in the same steps (a data-parallel degree of 2 would
    # give each rank its own half of the data, so other rows in each step).
    spec, base = runs.get("zero0-sgd-accum2", workers=1, grad_accum=2, **SGD)
    pp_spec, pp = runs.get("pp2-sgd", pipeline={"stages": 2, "micro_batches": 2}, **SGD)
    assert_rel_close(params_at(spec, base, 1), params_at(pp_spec, pp, 1), 1e-6)
    assert_trajectories_close(runs.losses(base), runs.losses(pp), 1e-2)


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_resume_reproduces_the_uninterrupted_run(runs, precision):
    # With dropout, so the random generators' state must come back too, not only the weights.
    _, base = runs.get(f"zero2-dropout-{precision}", zero={"stage": 2}, dropout=0.2,
                       precision=precision)
    checkpoint = base.sub("train/checkpoints/step_000010")
    _, resumed = runs.get(f"zero2-dropout-resumed-{precision}", resume=checkpoint,
                          zero={"stage": 2}, dropout=0.2, precision=precision)
    ref, again = runs.losses(base), runs.losses(resumed)
    _, no_dropout = runs.get("zero2", zero={"stage": 2}, checkpoint_every=0)
    assert runs.losses(no_dropout)[12] != ref[12], "dropout must change the losses"
    assert min(again) == 11, "the resumed run must start after the checkpoint's step"
    for step in range(11, STEPS + 1):
        assert abs(again[step] - ref[step]) <= 1e-6 * abs(ref[step]), (step, again[step], ref[step])


@pytest.mark.parametrize("key,train", [
    ("zero3-offload", {"checkpoint_every": 0,
                       "zero": {"stage": 3, "offload_optimizer": True, "offload_params": True}}),
    ("pp2-sgd", {"pipeline": {"stages": 2, "micro_batches": 2}, **SGD}),
])
def test_model_safetensors_holds_the_gathered_weights(runs, key, train):
    """ZeRO-3 shards and pipeline stages are gathered into one model.safetensors, which
    bigopt.load_model reads without DeepSpeed: the same tensors as the engine checkpoint's fp32
    master weights, and a model artifact that names its parent (the data artifact)."""
    from bigopt.load import load_model

    spec, run = runs.get(key, **train)
    artifact = run.read_json("train/artifact.json")
    assert artifact["weights"] == run.uri_of("train/model.safetensors")
    assert artifact["parent"].endswith("/data/artifact.json")
    loaded = [p.detach() for p in load_model(run.uri).parameters()]
    reference = params_at(spec, run, STEPS)
    assert len(loaded) == len(reference)
    for a, b in zip(loaded, reference, strict=True):
        assert torch.equal(a, b)


def test_checkpoints_keep_last(runs):
    _, run = runs.get("zero0")  # checkpoint_at [1], every 10, keep_last 3
    kept = sorted(os.path.basename(p) for p in glob.glob(run.sub("train/checkpoints/step_*")))
    assert kept == ["step_000001", "step_000010", "step_000020"]


def test_hybrid_pipeline_x_data_parallel_matches_data_parallel(runs):
    # 4 workers = 2 pipeline stages x 2 data ranks, 2 micro-batches each, ZeRO-1 ==
    # 2 data ranks with 2 accumulation steps: the same 16 samples per optimizer step.
    dp_spec, dp = runs.get("zero0-ga2-sgd", grad_accum=2, **SGD)
    hy_spec, hybrid = runs.get("pp2xdp2-sgd", workers=4, zero={"stage": 1},
                               pipeline={"stages": 2, "micro_batches": 2}, **SGD)
    assert hybrid.read_json("train/result.json")["layout"]["dp"] == 2
    assert_rel_close(params_at(dp_spec, dp, 1), params_at(hy_spec, hybrid, 1), 1e-6)
    assert_trajectories_close(runs.losses(dp), runs.losses(hybrid), 1e-2)


def test_activation_checkpointing_changes_memory_not_maths(runs):
    _, base = runs.get("zero0")
    _, ac = runs.get("zero0-ac", activation_checkpointing=True, checkpoint_every=0)
    assert_trajectories_close(runs.losses(base), runs.losses(ac), 1e-4)
    saved = {name: r.read_json("train/result.json")["engine"]["saved_activation_mb"]
             for name, r in (("plain", base), ("checkpointed", ac))}
    assert saved["checkpointed"] < 0.6 * saved["plain"], saved


def test_zero3_with_cpu_offload_trains_like_zero0(runs):
    # DeepSpeedCPUAdam (offload) and torch AdamW differ in rounding only.
    _, base = runs.get("zero0")
    _, off = runs.get("zero3-offload", checkpoint_every=0,
                      zero={"stage": 3, "offload_optimizer": True, "offload_params": True})
    assert_trajectories_close(runs.losses(base), runs.losses(off), 1e-3)
    engine = off.read_json("train/result.json")["engine"]
    assert engine["inner_optimizer"] == "DeepSpeedCPUAdam", engine  # offload ran the CPU Adam
    assert runs.get("zero0")[1].read_json("train/result.json")["engine"]["inner_optimizer"] != \
        "DeepSpeedCPUAdam"


def test_streaming_data_order_trains_from_ray_data(runs):
    # data_order "streaming" (not the default) is what this test is for: the train split goes
    # through bigopt.data.ingest.read_shards and Ray Train's streaming_split instead of each
    # rank's ShardPlan. Precision auto: the user's default (bf16 on CPU).
    _, run = runs.get("streaming", data_order="streaming", precision="auto", checkpoint_every=0)
    losses = runs.losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = (sum(losses[s] for s in steps) / 5 for steps in (range(1, 6), range(16, 21)))
    assert last < first, losses  # it learns from the streamed batches
    assert run.read_json("resolved.json")["data_order"] == "streaming"
