"""The content-addressed cache of prepared data: what makes a hit and a miss, a stage killed
while publishing, and ``bigopt cache`` (real data stage, real CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import bigopt
from bigopt.artifacts import parse_artifact, read_artifact_at
from bigopt.data.cache import cache_key, complete_entry, entries
from bigopt.resolve import resolve
from bigopt.runtime import RunDir

from factories import make_spec, run_cli, spec_dict


def text_tree(root) -> str:
    """12 small, distinct Python modules (seeded words: no noise, no near-duplicates)."""
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "total", "count", "value", "index", "items",
             "result", "buffer", "offset", "length", "factor", "weight", "margin", "cursor"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        lines = [f"def {rng.choice(words)}_{i}_{j}({rng.choice(words)}, {rng.choice(words)}):\n"
                 f"    return {rng.choice(words)} * {rng.randint(2, 999)} - {rng.choice(words)}\n"
                 for j in range(30)]
        (root / f"m{i:02d}.py").write_text("".join(lines))
    return str(root)


def tree_spec(storage, tree, **data):
    return make_spec(storage, data={"source": {"kind": "text_tree", "path": tree}, **data})


def test_the_key_follows_the_source_the_data_section_and_nothing_else(tmp_path):
    tree = text_tree(tmp_path / "src")
    key = cache_key(resolve(tree_spec(tmp_path, tree)))
    assert key == cache_key(resolve(tree_spec(tmp_path, tree)))
    # where the work runs is not part of the key; storage is where the cache lives
    assert key == cache_key(resolve(tree_spec(tmp_path, tree, engine="distributed")))
    assert key == cache_key(resolve(tree_spec(tmp_path / "elsewhere", tree)))
    changes = [tree_spec(tmp_path, tree, steps=[{"kind": "noise", "min_chars": 5}]),
               tree_spec(tmp_path, tree, split={"val": 0.2}),
               tree_spec(tmp_path, tree, context=16)]
    assert len({key, *(cache_key(resolve(s)) for s in changes)}) == 4
    (tmp_path / "src" / "m03.py").write_text("def g():\n    return 3\n")  # an edited file
    assert cache_key(resolve(tree_spec(tmp_path, tree))) != key
    (tmp_path / "src" / "new.py").write_text("x = 1\n")  # an added file
    edited = cache_key(resolve(tree_spec(tmp_path, tree)))
    assert len({key, edited}) == 2


@pytest.mark.slow
def test_a_second_run_hits_and_a_changed_input_misses(ray_session, repo_root, tmp_path):
    tree = text_tree(tmp_path / "src")
    spec = spec_dict(tmp_path, data={"source": {"kind": "text_tree", "path": tree}})
    first, run1 = run_cli(repo_root, spec, tmp_path, "data")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "cache miss" in first.stderr + first.stdout
    moved = str(tmp_path / "first-run")
    os.rename(run1, moved)  # run_cli returns the one run dir it finds under the job's name
    again, run2 = run_cli(repo_root, spec, tmp_path, "data")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "cache hit" in again.stderr + again.stdout
    hit = RunDir(run2).stage("data")
    info, manifest = hit.read_json("cache.json"), hit.read_json("manifest.json")
    assert info["hit"] and manifest["cache"]["hit"] and info["prepared_in"] == run1
    artifact = json.load(open(os.path.join(run2, "data", "artifact.json")))
    assert artifact["splits"]["train"]["uri"].startswith(info["entry"])  # linked to the entry
    # lineage: what a later stage names as its parent is this run's data/artifact.json
    assert read_artifact_at(parse_artifact(artifact).artifact_uri).fingerprint == artifact["fingerprint"]
    assert "cache hit" in open(os.path.join(run2, "report.md")).read()
    # the cached artifact trains like a fresh one: the shards are where it says
    first_manifest = json.load(open(os.path.join(moved, "data", "manifest.json")))
    assert manifest["splits"] == first_manifest["splits"]
    # a changed step parameter misses (through the in-process API: the same code path)
    changed = make_spec(tmp_path, data={"source": {"kind": "text_tree", "path": tree},
                                        "steps": [{"kind": "incomplete"}]})
    result = bigopt.run(changed, stages=["data"])
    assert not RunDir(result.run_uri).stage("data").read_json("cache.json")["hit"]
    assert len([e for e in entries(str(tmp_path)) if e["complete"]]) == 2


@pytest.mark.slow
def test_a_stage_killed_while_publishing_leaves_no_entry_a_run_reads(ray_session, repo_root, tmp_path):
    tree = text_tree(tmp_path / "src")
    spec = spec_dict(tmp_path, data={"source": {"kind": "text_tree", "path": tree}})
    path = tmp_path / "job.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "bigopt.cli", "data", str(path), "--set", f"storage={tmp_path}"]
    killed = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "BIGOPT_FAILPOINT": "cache-publish"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (entry,) = entries(str(tmp_path))
    assert not entry["complete"] and entry["bytes"] > 0  # files copied, no marker
    assert complete_entry(RunDir(entry["uri"])) is None
    listing = subprocess.run([sys.executable, "-m", "bigopt.cli", "cache", "ls", "--storage",
                              str(tmp_path)], capture_output=True, text=True, cwd=repo_root)
    assert "INCOMPLETE" in listing.stdout
    redo = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert redo.returncode == 0 and "cache miss" in redo.stderr + redo.stdout, redo.stderr[-2000:]
    (entry,) = entries(str(tmp_path))
    assert entry["complete"]
    # bigopt cache rm: by key, and by age
    rm = subprocess.run([sys.executable, "-m", "bigopt.cli", "cache", "rm", entry["key"],
                         "--storage", str(tmp_path)], capture_output=True, text=True, cwd=repo_root)
    assert rm.returncode == 0 and entries(str(tmp_path)) == []
    none = subprocess.run([sys.executable, "-m", "bigopt.cli", "cache", "rm", "--older-than", "0",
                           "--storage", str(tmp_path)], capture_output=True, text=True, cwd=repo_root)
    assert none.returncode == 0
