"""When the checkpoint manager saves (the saving itself runs in tests/train/test_strategies.py)."""

from __future__ import annotations

from bigopt.train.checkpoint import CheckpointManager, checkpoint_dir_name


def test_should_save_interval_extra_steps_and_last():
    manager = CheckpointManager(engine=None, every=10, world_rank=0, at=[1])
    saved = [s for s in range(1, 26) if manager.should_save(s, last=s == 25)]
    assert saved == [1, 10, 20, 25]
    never = CheckpointManager(engine=None, every=0, world_rank=0)
    assert [s for s in range(1, 6) if never.should_save(s, last=s == 5)] == [5]


def test_directory_names_sort_by_step():
    names = [checkpoint_dir_name(s) for s in (2, 10, 100)]
    assert names == sorted(names) == ["step_000002", "step_000010", "step_000100"]
