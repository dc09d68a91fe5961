"""exact_dedup and near_dedup steps (bigopt.data.dedup) on small synthetic corpora."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import numpy as np
import pytest

from bigopt.data import dedup
from bigopt.data.steps import StepContext

TEXT = StepContext(key="path", content="text", label=None, modality="text", seed=0)
IMAGE = StepContext(key="id", content="inputs", label="labels", modality="image", seed=0)
EXACT = SimpleNamespace(kind="exact_dedup")


def near(**kw):
    return SimpleNamespace(**{"kind": "near_dedup", "threshold": 0.8, "shingle": 5, "num_perm": 128,
                              "action": "drop", **kw})


def random_text(rng: random.Random, n: int = 2000) -> str:
    """Lines of made-up identifiers: two such texts share almost no 5-byte shingles."""
    def word() -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 8)))
    lines = [" ".join(word() for _ in range(rng.randint(3, 9))) for _ in range(n // 20)]
    return "\n".join(lines)[:n]


def jaccard(x: str, y: str, k: int = 5) -> float:
    sx = {x[i:i + k] for i in range(len(x) - k + 1)}
    sy = {y[i:i + k] for i in range(len(y) - k + 1)}
    return len(sx & sy) / len(sx | sy)


def edit(rng: random.Random, text: str, changes: int = 4) -> str:
    chars = list(text)
    for _ in range(changes):
        chars[rng.randrange(len(chars))] = rng.choice("QZ#@")
    return "".join(chars)


def counts(out, ds):
    """Counted independently, as the runner does."""
    return ds.count(), out.kept.count(), out.rejected.count()


def rows(ds, *cols):
    return sorted(tuple(r[c] for c in cols) for r in ds.iter_rows())


def test_signatures_estimate_jaccard():
    rng = random.Random(1)
    a = random_text(rng, 3000)
    b = edit(rng, a, 3)
    c = random_text(rng, 3000)
    sig = dedup.minhash_signatures([a.encode(), b.encode(), c.encode()], 5, 128)
    assert sig.shape == (3, 128) and sig.dtype == np.uint32
    for i, j, x, y in [(0, 1, a, b), (0, 2, a, c)]:  # 128 permutations: standard error <= 0.045
        assert abs((sig[i] == sig[j]).mean() - jaccard(x, y)) < 0.12
    assert (sig[0] == sig[1]).mean() > 0.85 and (sig[0] == sig[2]).mean() < 0.1
    # same input, same signature (fixed seed), whatever the batch it comes in
    again = dedup.minhash_signatures([c.encode(), a.encode()], 5, 128)
    assert (again[1] == sig[0]).all() and (again[0] == sig[2]).all()


def test_lsh_params_match_datasketch():
    lsh = pytest.importorskip("datasketch.lsh")
    for threshold, num_perm in [(0.8, 128), (0.5, 128), (0.9, 256), (0.7, 64)]:
        assert dedup.lsh_params(threshold, num_perm) == lsh._optimal_param(threshold, num_perm, 0.5, 0.5)


def test_exact_duplicates_text(ray_session):
    items = [{"path": "b/__init__.py", "text": b"x = 1\n"},
             {"path": "a/__init__.py", "text": b"x = 1\n"},
             {"path": "c/__init__.py", "text": b"x = 1\n"},
             {"path": "d.py", "text": b"y = 2\n"},
             {"path": "e.py", "text": b"y = 2\n"},
             {"path": "f.py", "text": b"z = 3\n"}]
    ds = ray_session.data.from_items(items, override_num_blocks=3)
    out = dedup.exact_duplicates(ds, EXACT, TEXT)
    assert counts(out, ds) == (6, 3, 3)
    assert rows(out.kept, "path") == [("a/__init__.py",), ("d.py",), ("f.py",)]
    assert set(out.kept.schema().names) == {"path", "text"}
    assert rows(out.rejected, "path", "step", "reason") == [
        ("b/__init__.py", "exact_dedup", "exact_duplicate: same content as a/__init__.py"),
        ("c/__init__.py", "exact_dedup", "exact_duplicate: same content as a/__init__.py"),
        ("e.py", "exact_dedup", "exact_duplicate: same content as d.py")]
    assert out.details["duplicate_groups"] == 2 and out.details["rows_removed"] == 3
    assert out.details["examples"][0] == {"kept": "a/__init__.py", "rows": 3,
                                          "rejected": ["b/__init__.py", "c/__init__.py"]}


def test_exact_duplicates_images(ray_session):
    rng = np.random.default_rng(0)
    imgs = rng.random((5, 4, 4), dtype=np.float32)
    items = [{"id": i, "inputs": imgs[i % 3], "labels": i % 2} for i in range(5)]  # 3==0, 4==1
    items.append({"id": 9, "inputs": imgs[0].reshape(2, 8), "labels": 0})  # same bytes, other shape
    ds = ray_session.data.from_items(items, override_num_blocks=2)
    out = dedup.exact_duplicates(ds, EXACT, IMAGE)
    assert counts(out, ds) == (6, 4, 2)
    assert rows(out.rejected, "id", "reason") == [(3, "exact_duplicate: same content as 0"),
                                                 (4, "exact_duplicate: same content as 1")]


def near_corpus():
    """a1, a2: a with 3 and 5 characters changed; c1: c with 10; b, b1, b2: a chain (28 changes
    per link: b~b1 and b1~b2 are near ~0.9, b~b2 only ~0.8); u00..u19 unrelated texts."""
    rng = random.Random(7)
    a, b = random_text(rng), random_text(rng)
    b1 = edit(rng, b, 28)
    b2 = edit(rng, b1, 28)
    c = random_text(rng)
    texts = {"a.py": a, "a1.py": edit(rng, a, 3), "a2.py": edit(rng, a, 5),
             "b.py": b, "b1.py": b1, "b2.py": b2, "c.py": c, "c1.py": edit(rng, c, 10)}
    texts.update({f"u{i:02d}.py": random_text(rng) for i in range(20)})
    return texts


def corpus_ds(ray, names=None, blocks=4):
    texts = near_corpus()
    return ray.data.from_items([{"path": p, "text": t.encode()} for p, t in texts.items()
                                if names is None or p in names], override_num_blocks=blocks)


def test_near_duplicates_found_and_distinct_kept(ray_session):
    ds = corpus_ds(ray_session, names={"a.py", "a1.py", "a2.py", "c.py", "c1.py"} | {
        f"u{i:02d}.py" for i in range(20)})
    out = dedup.near_duplicates(ds, near(), TEXT)
    n_in, n_kept, n_rej = counts(out, ds)
    assert n_in == n_kept + n_rej == 25 and n_rej == 3
    rejected = dict(rows(out.rejected, "path", "reason"))
    assert set(rejected) == {"a1.py", "a2.py", "c1.py"}
    assert re.fullmatch(r"near_duplicate: ~J=(0\.9\d|1\.00) with a\.py", rejected["a1.py"])
    assert rejected["c1.py"].endswith(" with c.py")
    assert {r["step"] for r in out.rejected.iter_rows()} == {"near_dedup"}
    assert set(out.kept.schema().names) == {"path", "text"}
    assert out.details["clusters"] == 2 and out.details["rows_removed"] == 3
    assert [e["kept"] for e in out.details["examples"]] == ["a.py", "c.py"]  # larger cluster first
    assert [s["key"] for s in out.details["examples"][0]["similar"]] == ["a1.py", "a2.py"]


def test_transitive_chain_is_one_cluster(ray_session):
    """b~b1 and b1~b2 pass the threshold, b~b2 does not (nor is it an LSH candidate): one
    cluster all the same, kept b."""
    texts = near_corpus()
    sig = dedup.minhash_signatures([texts[k].encode() for k in ("b.py", "b1.py", "b2.py")], 5, 128)
    direct = (sig[0] == sig[2]).mean()
    links = min((sig[0] == sig[1]).mean(), (sig[1] == sig[2]).mean())
    threshold = float((direct + links) / 2)  # ~0.84: between the links and the direct pair
    assert direct < threshold < links
    ds = corpus_ds(ray_session, names={"b.py", "b1.py", "b2.py", "u00.py", "u01.py"}, blocks=2)
    out = dedup.near_duplicates(ds, near(threshold=threshold), TEXT)
    assert rows(out.kept, "path") == [("b.py",), ("u00.py",), ("u01.py",)]
    assert out.details["clusters"] == 1 and out.details["examples"][0]["rows"] == 3
    reasons = dict(rows(out.rejected, "path", "reason"))
    assert reasons["b2.py"] == f"near_duplicate: ~J={direct:.2f} with b.py"  # below the threshold


def test_group_action_rejects_nothing(ray_session):
    ds = corpus_ds(ray_session, blocks=3)
    out = dedup.near_duplicates(ds, near(action="group", threshold=0.84), TEXT)
    assert counts(out, ds) == (28, 28, 0)
    groups = dict(rows(out.kept, "path", "group"))
    assert groups["a.py"] == groups["a1.py"] == groups["a2.py"] == "a.py"
    assert groups["b.py"] == groups["b1.py"] == groups["b2.py"] == "b.py"
    assert groups["c.py"] == groups["c1.py"] == "c.py"
    assert groups["u03.py"] == "u03.py"
    assert len(set(groups.values())) == 28 - 5
    assert out.details["rows_removed"] == 0 and out.details["clusters"] == 3


def test_deterministic(ray_session):
    results = []
    for blocks in (2, 5, 5):  # another block layout, and the same one again: same answer
        ds = corpus_ds(ray_session, blocks=blocks)
        out = dedup.near_duplicates(ds, near(), TEXT)
        details = {k: v for k, v in out.details.items() if k != "phase_seconds"}  # timings
        results.append((rows(out.kept, "path"), rows(out.rejected, "path", "reason"), details))
    assert results[0] == results[1] == results[2]
    assert results[0][0] and results[0][1]


def test_short_and_empty_texts(ray_session):
    ds = ray_session.data.from_items([{"path": "a", "text": b"ab"}, {"path": "b", "text": b"ab"},
                                      {"path": "c", "text": b"xyz"}, {"path": "d", "text": b""}])
    out = dedup.near_duplicates(ds, near(), TEXT)
    assert counts(out, ds) == (4, 3, 1)
    assert rows(out.rejected, "path") == [("b",)]


def test_near_dedup_needs_text(ray_session):
    ds = ray_session.data.from_items([{"id": 0, "inputs": np.zeros(3, np.float32), "labels": 0}])
    with pytest.raises(ValueError, match=r"data\.steps.*kind.*near_dedup needs text"):
        dedup.near_duplicates(ds, near(), IMAGE)


def test_large_bucket_pairs_stay_linear():
    """A bucket of m > MAX_BUCKET_PAIRS_MEMBERS keys: the smallest key paired with every other,
    plus neighbours in key order (2m - 3 pairs), instead of m(m-1)/2; small buckets: all pairs."""
    m = dedup.MAX_BUCKET_PAIRS_MEMBERS + 6
    keys = [f"k{i:03d}" for i in range(m)]
    # one hash partition's band rows: a big bucket, a small one (band 1) and a lone key
    members = [*reversed(keys), "b", "a", "c", "lone"]
    pairs = dedup._partition_pairs({
        "band": np.array([0] * m + [1, 1, 1, 0]), "bucket": np.array([7] * m + [7, 7, 7, 9]),
        "key": np.array(members, dtype=object)})
    got = set(zip(pairs["a"].tolist(), pairs["b"].tolist(), strict=True))
    assert {("a", "b"), ("a", "c"), ("b", "c")} <= got
    big = {p for p in got if p[0].startswith("k")}
    assert len(big) == 2 * m - 3 and all(x < y for x, y in big)
    uf = dedup._UnionFind()
    for x, y in big:
        uf.union(x, y)
    assert {uf.find(k) for k in keys} == {"k000"}


@pytest.mark.parametrize("action", ["drop", "group"])
def test_pairs_in_one_task_partitioned_or_shuffled_agree(ray_session, monkeypatch, caplog, action):
    """The engine rule inside near_dedup: candidate pairs and signatures small enough are
    verified and clustered in one task; over the rule (4 KB here) they meet in a hash join of
    Ray tasks over several partitions and the verified pairs are clustered in one task; with
    the rule at 0 bytes the clusters come from min-label propagation on Ray Data and every
    row lookup is a cogroup. Same rows, reasons, groups and details all three ways."""
    import logging

    from bigopt.data import engine, pair_join

    monkeypatch.setattr(pair_join, "PART_BYTES", 2048)  # several partitions on a small corpus
    caplog.set_level(logging.INFO, logger="bigopt")
    results, paths = [], []
    for limit in (engine.SINGLE_TASK_MAX_BYTES, 4096, 0):
        monkeypatch.setattr(engine, "SINGLE_TASK_MAX_BYTES", limit)
        caplog.clear()
        ds = corpus_ds(ray_session, blocks=3)
        out = dedup.near_duplicates(ds, near(action=action, threshold=0.84), TEXT)
        details = {k: v for k, v in out.details.items() if k != "phase_seconds"}
        cols = ("path", "group") if action == "group" else ("path",)
        results.append((rows(out.kept, *cols), rows(out.rejected, "path", "reason"), details))
        paths.append(("hash partitions" in caplog.text, "rounds of label propagation" in caplog.text))
    assert results[0] == results[1] == results[2]
    assert paths == [(False, False), (True, False), (True, True)]
    assert details["clusters"] == 3 and results[0][0]
    assert action == "group" or len(results[0][1]) == details["rows_removed"] == 5


@pytest.mark.parametrize("part_bytes", [64 * 2**20, 4096])
def test_candidate_pairs_in_tasks_match_one_process(ray_session, monkeypatch, part_bytes):
    """The distributed candidates (band rows hash-partitioned by Ray tasks, pairs kept once)
    are the single path's: the same pairs with one partition and with many; a bucket of more
    than MAX_BUCKET_PAIRS_MEMBERS keys (80 copies of one text) too."""
    from bigopt.data import pair_join

    monkeypatch.setattr(pair_join, "PART_BYTES", part_bytes)
    texts = {**near_corpus(), **{f"same{i:02d}.py": "x = 1\n" * 40 for i in range(80)}}
    keys = np.array(sorted(texts), dtype=object)
    sig = dedup.minhash_signatures([texts[k].encode() for k in keys], 5, 128)
    sigs = ray_session.data.from_items([{"path": k, "sig": s} for k, s in zip(keys, sig, strict=True)],
                                       override_num_blocks=3).materialize()
    bands, rows_per_band = dedup.lsh_params(0.8, 128)
    pairs, n = dedup._candidate_pairs(sigs, "path", bands, rows_per_band, 128)
    got = {(r["a"], r["b"]) for r in pairs.iter_rows()}
    assert got == dedup.local_candidates(keys, sig, bands, rows_per_band)
    assert n == len(got) == pairs.count() > 2 * 80  # each pair once
