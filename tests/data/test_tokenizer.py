"""BPE tokenizer: trained on the training split, saved with the data, used for the windows."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bigopt.data.tokenizer import encode, from_json, train_bpe
from bigopt.spec import SpecError, parse_spec


def stdlib_texts(n=40):
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(errors="replace") for p in sorted(root.glob("*.py"))[:n]]


def test_bpe_round_trips_and_compresses_real_code():
    texts = stdlib_texts()
    tok = train_bpe(texts, 1024)
    assert tok.get_vocab_size() == 1024 and tok.token_to_id("<|pad|>") == 0
    text = texts[-1]
    ids = next(encode([text], tok.to_str()))
    assert from_json(tok.to_str()).decode(ids) == text  # byte-level: lossless
    assert len(text.encode()) / len(ids) > 2.0  # code compresses well past one byte per token
    assert 0 not in ids  # padding never appears in text


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_refused():
    with pytest.raises(SpecError) as info:
        parse_spec({"name": "x", "data": {"tokenizer": "bpe", "vocab_size": 4096},
                    "model": {"kind": "gpt", "vocab_size": 256}})
    assert "model.vocab_size" in dict(info.value.problems)


@pytest.mark.slow
def test_data_stage_trains_and_ships_the_tokenizer(ray_session, tmp_path):
    import bigopt
    from bigopt.artifacts import read_artifact
    from bigopt.runtime import RunDir

    spec = parse_spec({"name": "bpe", "storage": str(tmp_path),
                       "data": {"source": {"kind": "text_tree", "path": "stdlib", "max_files": 60},
                                "tokenizer": "bpe", "vocab_size": 1024, "split": {"val": 0.2},
                                "context": 32}})
    run = RunDir(bigopt.run(spec, stages=["data"]).run_uri)
    artifact = read_artifact(run, "data")
    assert artifact.tokenizer["kind"] == "bpe" and artifact.tokenizer["vocab_size"] == 1024
    tokenizer_json = open(artifact.tokenizer["uri"]).read()
    shards = sorted(p for p in os.listdir(os.path.join(run.path, "data", "train")) if p.endswith(".parquet"))
    table = pq.read_table(os.path.join(run.path, "data", "train", shards[0])).to_pylist()
    ids = np.concatenate([np.asarray(r["input_ids"]) for r in table])
    assert ids.max() < 1024 and ids.min() >= 0
    # a file's first window decodes to the start of that file
    first = next(r for r in table if r["window"] == 0)
    root = Path(sysconfig.get_paths()["stdlib"])
    text = (root / first["path"]).read_text(errors="replace")
    window = [int(t) for t in first["input_ids"] if t != 0]
    assert text.startswith(from_json(tokenizer_json).decode(window))
    manifest = json.load(open(os.path.join(run.path, "data", "manifest.json")))
    assert manifest["tokenizer"]["trained_on"] == "train split"
