"""When the checkpoint manager saves (the saving itself runs in tests/train/test_strategies.py)."""

from __future__ import annotations

from bigopt.runtime import RunDir
from bigopt.train.checkpoint import (
    COMPLETE_FILE,
    CheckpointManager,
    checkpoint_dir_name,
    complete_checkpoints,
    rng_state,
    set_rng_state,
    step_of,
)
from bigopt.train.layout import latest_checkpoint
from bigopt.train.reporting import LocalReporter


def test_should_save_interval_extra_steps_and_last(tmp_path):
    reporter = LocalReporter(RunDir.create(str(tmp_path), "r"))
    manager = CheckpointManager(None, reporter, every=10, world_rank=0, at=[1])
    saved = [s for s in range(1, 26) if manager.should_save(s, last=s == 25)]
    assert saved == [1, 10, 20, 25]
    never = CheckpointManager(None, reporter, every=0, world_rank=0)
    assert [s for s in range(1, 6) if never.should_save(s, last=s == 5)] == [5]


def test_directory_names_sort_by_step():
    names = [checkpoint_dir_name(s) for s in (2, 10, 100)]
    assert names == sorted(names) == ["step_000002", "step_000010", "step_000100"]


def test_step_of_reads_the_directory_name():
    assert step_of("/x/train/checkpoints/step_000040") == 40
    assert step_of("bucket/run/train/checkpoints/step_000040/") == 40
    assert step_of("/x/elsewhere/my_ckpt") == -1


def test_only_checkpoints_every_rank_finished_count(tmp_path):
    run = RunDir.create(str(tmp_path), "r", run_id="1").stage("train")
    for step, session in ((10, "a"), (20, "a"), (30, "b")):
        run.write_text(f"checkpoints/{checkpoint_dir_name(step)}/state/shard", "x")
        run.write_json(f"checkpoints/{checkpoint_dir_name(step)}/{COMPLETE_FILE}",
                       {"step": step, "session": session})
    # a crash mid-save: shards on storage, no completion marker
    run.write_text(f"checkpoints/{checkpoint_dir_name(40)}/state/shard", "x")
    run.write_text("checkpoints/checkpoint_manager_snapshot.json", "{}")
    # a crash while rank 0 wrote the marker itself
    run.write_text(f"checkpoints/{checkpoint_dir_name(50)}/{COMPLETE_FILE}", '{"step": 5')
    assert [step_of(p) for p in complete_checkpoints(run)] == [10, 20, 30]
    assert [step_of(p) for p in complete_checkpoints(run, session="a")] == [10, 20]
    assert step_of(latest_checkpoint(run)) == 30
    assert latest_checkpoint(RunDir.create(str(tmp_path), "empty", run_id="1").stage("train")) is None


def test_an_explicit_resume_of_a_checkpoint_cut_short_is_refused(tmp_path):
    """``--resume .../checkpoints/step_N`` needs the marker too: a run killed mid-upload leaves
    some ranks' files without it (tests/train/test_s3_faults.py does that on S3)."""
    import pytest

    from bigopt.train.layout import is_complete
    from bigopt.train.stage import IncompleteCheckpointError, refuse_incomplete

    run = RunDir.create(str(tmp_path), "r", run_id="1").stage("train")
    run.write_text(f"checkpoints/{checkpoint_dir_name(10)}/state/shard", "x")
    run.write_json(f"checkpoints/{checkpoint_dir_name(10)}/{COMPLETE_FILE}", {"step": 10})
    run.write_text(f"checkpoints/{checkpoint_dir_name(20)}/state/shard", "x")
    run.write_text(f"checkpoints/{checkpoint_dir_name(30)}/{COMPLETE_FILE}", '{"step": 3')
    assert [is_complete(run.fs, run.sub(f"checkpoints/{checkpoint_dir_name(s)}"))
            for s in (10, 20, 30, 40)] == [True, False, False, False]
    refuse_incomplete(run.uri_of(f"checkpoints/{checkpoint_dir_name(10)}"))
    for step in (20, 30):
        with pytest.raises(IncompleteCheckpointError, match="incomplete.*--resume latest"):
            refuse_incomplete(run.uri_of(f"checkpoints/{checkpoint_dir_name(step)}"))
    refuse_incomplete(str(tmp_path / "mine" / "step_000020"))  # not bigopt's layout: no marker to ask for
    refuse_incomplete("latest")
    refuse_incomplete(None)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import torch

    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = torch.rand(5)
    torch.manual_seed(4)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(5), expected)


def test_local_reporter_saves_loads_and_keeps_last(tmp_path):
    """One process, no Ray Train: checkpoints land in the run dir, keep_last applies, and load()
    restores the engine's weights and the trainer state from the newest one."""
    import torch

    from bigopt.models import MLP
    from bigopt.spec import TrainSpec
    from bigopt.train.engine import DDPEngine

    run = RunDir.create(str(tmp_path), "r").stage("train")
    torch.manual_seed(0)
    engine = DDPEngine(MLP(in_features=4, hidden=[8], num_classes=2), TrainSpec(), "fp32",
                       torch.device("cpu"))
    manager = CheckpointManager(engine, LocalReporter(run, keep_last=2), every=1, world_rank=0)
    for step in (1, 2, 3):
        with torch.no_grad():
            next(engine.module.parameters()).fill_(float(step))
        assert manager.save(step, {"step": step, "samples_seen": 0}, {"loss": 1.0})
    kept = sorted({p.split("/")[1] for p in run.list("checkpoints")})
    assert kept == ["step_000002", "step_000003"]
    assert manager.uri_of(3) == run.uri_of("checkpoints/step_000003")
    with torch.no_grad():
        next(engine.module.parameters()).zero_()
    state = manager.load(manager.uri_of(3))
    assert state["step"] == 3
    assert torch.all(next(engine.module.parameters()) == 3.0)
