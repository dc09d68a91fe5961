"""Tokenizing text into windows: every token is predicted exactly once, padding never learned."""

from __future__ import annotations

import numpy as np

from bigopt.data.text import IGNORE_INDEX, list_files, read_and_check, resolve_root, to_windows


def windows_of(text: bytes, context: int):
    return to_windows({"path": np.array(["f.py"], dtype=object),
                       "text": np.array([text], dtype=object),
                       "split": np.array(["train"], dtype=object)}, context)


def test_windows_cover_every_next_token_once():
    text = bytes(range(1, 200)) * 3  # 597 bytes
    out = windows_of(text, context=64)
    labels = out["labels"][out["labels"] != IGNORE_INDEX]
    assert len(labels) == len(text) - 1 == out["n_tokens"].sum()
    assert np.array_equal(labels, np.frombuffer(text, np.uint8)[1:])
    # inputs and labels are shifted by one inside each window
    x, y = out["input_ids"][0], out["labels"][0]
    assert np.array_equal(x[1:], y[:-1])


def test_short_file_is_one_padded_window():
    out = windows_of(b"print(1)\n", context=32)
    assert out["input_ids"].shape == (1, 32)
    assert (out["labels"][0] != IGNORE_INDEX).sum() == 8


def test_read_and_check_rejects_with_reasons_and_keeps_row_count(tmp_path):
    (tmp_path / "ok.py").write_text("x = 1\n")
    (tmp_path / "empty.py").write_text("   \n")
    (tmp_path / "latin.py").write_bytes("é = 1".encode("latin-1"))
    (tmp_path / "big.py").write_text("x" * 100)
    (tmp_path / "nul.py").write_bytes(b"a\x00b")
    paths = ["ok.py", "empty.py", "latin.py", "big.py", "nul.py", "missing.py"]
    out = read_and_check({"path": np.array(paths, dtype=object)}, str(tmp_path), max_bytes=50)
    reasons = dict(zip(paths, out["reject_reason"], strict=True))
    assert reasons["ok.py"] == ""
    assert reasons["empty.py"] == "empty"
    assert reasons["latin.py"] == "not_utf8"
    assert reasons["big.py"].startswith("too_large")
    assert reasons["nul.py"].startswith("binary")
    assert reasons["missing.py"].startswith("unreadable")
    assert len(out["path"]) == len(paths)


def test_stdlib_corpus_is_found_and_excludes_site_packages():
    files = list_files(resolve_root("stdlib"), ["*.py"], ["site-packages/*"], None)
    assert len(files) > 500
    assert not any(f.startswith("site-packages") for f in files)
    assert files == sorted(files)


def test_windows_take_the_smallest_type_the_vocabulary_fits():
    """Byte (and BPE < 32k) windows are int16: half the shard and object-store bytes of int32,
    the same values, IGNORE_INDEX included; a larger vocabulary keeps int32."""
    text = bytes(range(1, 256)) * 2
    small = windows_of(text, context=64)
    assert small["input_ids"].dtype == small["labels"].dtype == np.int16
    big = to_windows({"path": np.array(["f.py"], dtype=object), "text": np.array([text], dtype=object),
                      "split": np.array(["train"], dtype=object)}, 64, vocab_size=40_000)
    assert big["input_ids"].dtype == np.int32
    assert np.array_equal(small["labels"], big["labels"]) and (small["labels"] == IGNORE_INDEX).any()
    assert np.array_equal(small["input_ids"], big["input_ids"]) and small["input_ids"].max() == 255
