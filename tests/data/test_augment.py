"""Image augmentation: seeded and reproducible, at prepare time (counted) and on the fly."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from bigopt.data.augment import OnTheFly, augment_images, augmented_copies
from bigopt.spec import AugmentSpec


def images(n=8, size=8):
    rng = np.random.default_rng(0)
    return rng.random((n, 1, size, size), dtype=np.float32)


def test_same_seed_same_images_and_they_change():
    spec = AugmentSpec()
    x = images()
    a, b = augment_images(x, spec, 1), augment_images(x, spec, 1)
    assert np.array_equal(a, b) and not np.allclose(a, x)
    assert not np.allclose(a, augment_images(x, spec, 2))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_each_transform_alone_does_what_it_says():
    x = images()
    flip = AugmentSpec(crop_padding=0, rotation=0, brightness=0, contrast=0, noise_std=0)
    flipped = augment_images(x, flip, 0)
    for original, out in zip(x, flipped, strict=True):  # each image: itself or its mirror
        assert np.allclose(out, original) or np.allclose(out, original[..., ::-1])
    noise = AugmentSpec(crop_padding=0, flip=False, rotation=0, brightness=0, contrast=0, noise_std=0.05)
    diff = augment_images(x, noise, 0) - x
    assert 0.02 < float(np.std(diff)) < 0.06  # clipping at 0/1 trims it a little


def test_prepare_time_copies_have_new_ids_and_the_same_labels():
    batch = {"id": np.array(["a", "b"]), "inputs": images(2), "labels": np.array([3, 7])}
    out = augmented_copies(batch, AugmentSpec(when="prepare", copies=2))
    assert list(out["id"]) == ["a#aug1", "b#aug1", "a#aug2", "b#aug2"]
    assert list(out["labels"]) == [3, 7, 3, 7] and out["inputs"].shape == (4, 1, 8, 8)
    again = augmented_copies(batch, AugmentSpec(when="prepare", copies=2))
    assert np.array_equal(out["inputs"], again["inputs"])


def test_on_the_fly_differs_per_epoch_and_repeats_per_run():
    spec = AugmentSpec()
    batch = {"inputs": images(4), "labels": np.arange(4)}
    first = OnTheFly(spec, "inputs", epoch_seed=0)(dict(batch))["inputs"]
    rerun = OnTheFly(spec, "inputs", epoch_seed=0)(dict(batch))["inputs"]
    next_epoch = OnTheFly(spec, "inputs", epoch_seed=1)(dict(batch))["inputs"]
    assert (first == rerun).all() and not (first == next_epoch).all()


@pytest.mark.slow
def test_data_stage_writes_counted_augmented_copies(ray_session, tmp_path):
    import bigopt
    from bigopt.spec import parse_spec

    spec = parse_spec({"name": "aug", "storage": str(tmp_path),
                       "data": {"source": {"kind": "digits", "max_rows": 300}, "split": {"val": 0.2},
                                "augment": {"when": "prepare", "copies": 2}}})
    run = bigopt.run(spec, stages=["data"]).run_uri
    manifest = json.load(open(os.path.join(run, "data", "manifest.json")))
    base = manifest["augmented"]["source_rows"]
    assert manifest["augmented"]["rows_added"] == 2 * base
    assert manifest["splits"]["train"]["rows"] == 3 * base
    assert manifest["rows_in"] == 300 == manifest["rows_kept"] + manifest["rows_rejected"]
    assert manifest["splits"]["val"]["rows"] + base == 300  # val is never augmented
    assert glob.glob(os.path.join(run, "data", "train", "*.parquet"))


@pytest.mark.slow
def test_training_augments_batches_on_the_fly(ray_session, tmp_path):
    import bigopt
    from bigopt.spec import parse_spec

    def spec(augment):
        data = {"source": {"kind": "digits", "max_rows": 400}, "split": {"val": 0.2}}
        if augment:
            data["augment"] = {"when": "train"}
        return parse_spec({"name": "fly", "storage": str(tmp_path), "cluster": {"num_workers": 1},
                           "data": data, "model": {"kind": "mlp", "in_features": 64, "hidden": [32]},
                           "train": {"strategy": "ddp", "precision": "fp32", "batch_size": 16,
                                     "max_steps": 12, "log_every": 1, "eval_every": 0,
                                     "checkpoint_every": 0}})

    def losses(run):
        return [json.loads(x)["loss"] for x in open(os.path.join(run, "train", "metrics.jsonl"))]

    plain = losses(bigopt.run(spec(False)).run_uri)
    fly = losses(bigopt.run(spec(True)).run_uri)
    fly_again = losses(bigopt.run(spec(True)).run_uri)
    assert fly == fly_again  # seeded: the same augmented batches every run
    assert fly != plain  # and they are not the plain batches
