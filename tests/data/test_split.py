"""Split by key hash, stratified by label when asked: exact per-label shares, order-free, the
Ray Data path agrees with the in-memory one, and a cluster of mixed labels stays whole."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from bigopt.data.split import add_split, stratified_assign, stratified_cuts
from bigopt.resolve import resolve
from bigopt.runtime import RunDir
from bigopt.spec import SpecError, SplitSpec, parse_spec

from factories import spec_dict


def shares(splits: np.ndarray, labels: np.ndarray) -> dict[tuple[int, str], int]:
    return Counter(zip(labels.tolist(), splits.tolist(), strict=True))


def test_stratified_split_gives_each_label_its_exact_share_in_any_order():
    rng = np.random.default_rng(0)
    labels = rng.choice(5, size=3001, p=[0.5, 0.2, 0.15, 0.1, 0.05])  # imbalanced classes
    keys = np.array([f"row-{i}" for i in range(len(labels))], dtype=object)
    split = SplitSpec(val=0.1, test=0.2, seed=7, stratify=True)
    out = stratified_assign(keys, labels, split)
    counts = shares(out, labels)
    for label, n in Counter(labels.tolist()).items():
        assert counts[(label, "test")] == round(n * 0.2)
        assert counts[(label, "val")] == round(n * 0.1)
        assert counts[(label, "train")] == n - round(n * 0.2) - round(n * 0.1)
    order = rng.permutation(len(keys))
    assert (stratified_assign(keys[order], labels[order], split) == out[order]).all()
    # the plain hash split is only right in expectation: the smallest class drifts from 10 %
    plain = add_split({"k": keys}, split.model_copy(update={"stratify": False}), "k")["split"]
    drift = [abs(shares(plain, labels)[(label, "val")] - round(n * 0.1))
             for label, n in Counter(labels.tolist()).items()]
    assert max(drift) > 0


@pytest.mark.slow  # several whole Ray Data executions: 30-50 s on 2 cores
def test_ray_data_cut_points_match_the_in_memory_split_and_keep_mixed_clusters_whole(ray_session):
    import ray

    rng = np.random.default_rng(1)
    n = 1200
    labels = rng.integers(0, 4, n)
    units = [f"u{i}" for i in range(n)]
    # near-duplicate clusters: rows 0..59 join cluster "u0".."u19" in threes, some with other labels
    for i in range(60):
        units[i] = f"u{i // 3}"
    split = SplitSpec(val=0.25, test=0.25, seed=3, stratify=True)
    ds = ray.data.from_items([{"group": u, "labels": int(y)} for u, y in zip(units, labels, strict=True)],
                             override_num_blocks=6)
    cuts = stratified_cuts(ds, "group", "labels", split)
    assert cuts.mixed  # random labels give some clusters rows of several labels
    rows = ds.map_batches(add_split, fn_kwargs={"split": split, "key": "group", "label": "labels",
                                                "cuts": cuts}).take_all()
    seen: dict[str, str] = {}
    for r in rows:
        assert seen.setdefault(r["group"], r["split"]) == r["split"], "a cluster straddles splits"
    # per label, counted in units (a cluster counts once, under its smallest label)
    stratum = {u: min(int(r["labels"]) for r in rows if r["group"] == u) for u in seen}
    per_label = Counter(stratum.values())
    placed = Counter((stratum[u], s) for u, s in seen.items())
    for label, count in per_label.items():
        assert placed[(label, "test")] == round(count * 0.25)
        assert placed[(label, "val")] == round(count * 0.25)
    # the same rule in memory on one row per unit
    keys = np.array(list(stratum), dtype=object)
    memory = stratified_assign(keys, np.array([stratum[u] for u in keys]), split)
    assert dict(zip(keys.tolist(), memory.tolist(), strict=True)) == seen


def test_stratify_needs_a_labelled_source(tmp_path):
    raw = spec_dict(tmp_path, data={"split": {"val": 0.1, "stratify": True}})
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    assert "data.split.stratify" in str(err.value)


@pytest.mark.slow  # several whole Ray Data executions: 30-50 s on 2 cores
def test_data_stage_stratifies_real_digits(ray_session, tmp_path):
    from bigopt.data.prepare import run_data

    raw = spec_dict(tmp_path, name="strat", train=None,
                    data={"source": {"kind": "digits", "path": None, "max_files": None},
                          "split": {"val": 0.15, "test": 0.15, "stratify": True}})
    raw["model"] = {"kind": "mlp", "in_features": 64, "num_classes": 10}
    spec = parse_spec(raw)
    run = RunDir.create(spec.storage, spec.name)
    manifest, _ = run_data(resolve(spec), run.stage("data"))
    assert manifest["split"]["stratify"] is True
    counts: Counter = Counter()
    for name, info in manifest["splits"].items():
        for shard in info["shards"]:
            table = pq.read_table(run.fs.open_input_file(run.sub(shard["path"])))
            counts.update((y, name) for y in table.column("labels").to_pylist())
    for label in range(10):
        n = sum(counts[(label, s)] for s in ("train", "val", "test"))
        assert counts[(label, "test")] == round(n * 0.15) and counts[(label, "val")] == round(n * 0.15)
    assert sum(counts.values()) == manifest["rows_kept"] == 1797  # the whole real data set
