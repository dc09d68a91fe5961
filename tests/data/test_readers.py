"""Readers for user data: text tables (JSONL, CSV, Parquet) and image folders, on local disk
and on an S3 server, through the data stage: rows conserved, bad files quarantined and named."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bigopt.runtime import RunDir
from bigopt.spec import SpecError, parse_spec

from factories import rejected_rows, spec_dict

GOOD = [f"record {i}: the quick brown fox {i * 7}" for i in range(12)]


def table_spec(tmp_path, source, model=None, **data):
    raw = spec_dict(tmp_path / "runs", name="tbl", train=None, model=None,
                    data={"source": {**source, "max_files": None}, "split": {"val": 0.25},
                          "context": 64, "steps": [], **data})  # the reader's rows, uncleaned
    if model is not None:
        raw["model"] = model
    return raw


def folder_spec(tmp_path, path, model=None, **source):
    raw = spec_dict(tmp_path / "runs", name="img", train=None, model=None,
                    data={"source": {"kind": "image_folder", "path": str(path), "max_files": None,
                                     **source},
                          # one grey level per class: identical images, kept (no exact_dedup)
                          "split": {"val": 0.25}, "steps": []})
    if model is not None:
        raw["model"] = model
    return raw


# --------------------------------------------------------------------------- spec (no Ray)
def test_spec_problems_name_the_field(tmp_path):
    with pytest.raises(SpecError) as err:
        parse_spec(table_spec(tmp_path, {"kind": "table", "format": "jsonl",
                                         "path": str(tmp_path / "nowhere")}))
    assert [p for p, _ in err.value.problems] == ["data.source.path"]
    with pytest.raises(SpecError) as err:
        parse_spec(table_spec(tmp_path, {"kind": "table", "format": "xml", "path": str(tmp_path)}))
    assert [p for p, _ in err.value.problems] == ["data.source.format"]
    with pytest.raises(SpecError) as err:
        parse_spec(table_spec(tmp_path, {"kind": "table", "path": str(tmp_path)}))
    assert [p for p, _ in err.value.problems] == ["data.source.format"]
    with pytest.raises(SpecError, match="data.source.path: .*does not exist"):
        parse_spec(table_spec(tmp_path, {"kind": "table", "format": "csv",
                                         "path": str(tmp_path / "none" / "*.csv")}))
    with pytest.raises(SpecError, match=r"model.kind: a table data source feeds a 'gpt'"):
        parse_spec(table_spec(tmp_path, {"kind": "table", "format": "csv", "path": str(tmp_path)},
                              model={"kind": "mlp"}))
    spec = parse_spec(table_spec(tmp_path, {"kind": "table", "format": "parquet",
                                            "path": "s3://bucket/corpus", "id": "doc"}))
    assert (spec.data.source.text, spec.data.source.id) == ("text", "doc")

    with pytest.raises(SpecError) as err:
        parse_spec(folder_spec(tmp_path, tmp_path / "nowhere"))
    assert [p for p, _ in err.value.problems] == ["data.source.path"]
    with pytest.raises(SpecError) as err:
        parse_spec(folder_spec(tmp_path, tmp_path, channels=2))
    assert [p for p, _ in err.value.problems] == ["data.source.channels"]
    # image models must match the folder's image_size and channels
    with pytest.raises(SpecError, match=r"model.image_size: image_folder images are 3x32x32"):
        parse_spec(folder_spec(tmp_path, tmp_path, model={"kind": "cnn", "image_size": 28},
                               image_size=32, channels=3))
    with pytest.raises(SpecError, match=r"model.in_features: image_folder images have 256 pixels"):
        parse_spec(folder_spec(tmp_path, tmp_path, model={"kind": "mlp", "in_features": 64},
                               image_size=16))
    parse_spec(folder_spec(tmp_path, tmp_path, model={"kind": "cnn", "image_size": 32,
                                                      "in_channels": 3}, image_size=32, channels=3))
    with pytest.raises(SpecError, match=r"model.kind: an image source"):
        parse_spec(folder_spec(tmp_path, tmp_path, model={"kind": "gpt"}))


# --------------------------------------------------------------------------- per-file readers (no Ray)
def test_read_table_files_gz_tsv_globs_and_ids(tmp_path):
    import gzip

    from bigopt.data.readers import TABLE_SUFFIXES, list_source_files, read_table_files

    root = tmp_path / "c"
    root.mkdir()
    with gzip.open(root / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps({"k": 7, "body": "hello"}) + "\n" + json.dumps({"k": None, "body": "x"}) + "\n")
    (root / "b.tsv").write_text("k\tbody\n1\tone\ttab\n")  # a row with too many fields
    (root / "c.tsv").write_text("k\tbody\n2\ttwo\n")
    (root / ".hidden.jsonl").write_text("{}\n")
    fs, base, files = list_source_files(str(root), TABLE_SUFFIXES["jsonl"])
    assert [f[len(base) + 1:] for f in files] == ["a.jsonl.gz"]
    _, _, files = list_source_files(str(root / "*.tsv"), TABLE_SUFFIXES["csv"])
    assert [f.rsplit("/", 1)[-1] for f in files] == ["b.tsv", "c.tsv"]
    out = read_table_files({"file": np.array([str(root / "a.jsonl.gz")], dtype=object)},
                           uri=str(root), base=str(root), fmt="jsonl", text="body", id_column="k")
    assert out["path"].tolist() == ["7", "a.jsonl.gz#1"]
    assert out["text"].tolist() == [b"hello", b""]
    assert out["reject_reason"].tolist() == ["", "incomplete: k is null"]
    out = read_table_files({"file": np.array(files, dtype=object)}, uri=str(root), base=str(root),
                           fmt="csv", text="body", id_column=None)
    assert out["path"].tolist() == ["b.tsv", "c.tsv#0"]
    assert out["reject_reason"][0].startswith("unreadable: not valid csv")
    assert out["text"].tolist() == [b"", b"two"]


def test_decode_images_resizes_and_rejects(tmp_path):
    from bigopt.data.readers import decode_images

    rgb = np.zeros((6, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    batch = {"path": np.array(["/r/red/a.png", "/r/red/b.png", "/r/loose.png"], dtype=object),
             "bytes": np.array([png(rgb), b"garbage", png(rgb)], dtype=object)}
    out = decode_images(batch, base="/r", classes=["blue", "red"], size=4, channels=3)
    assert out["id"].tolist() == ["red/a.png", "red/b.png", "loose.png"]
    assert out["inputs"].shape == (3, 3, 4, 4) and out["inputs"].dtype == np.float32
    assert np.allclose(out["inputs"][0][0], 1) and np.allclose(out["inputs"][0][1:], 0)
    assert out["labels"].tolist() == [1, 1, -1]
    assert out["reject_reason"][0] == ""
    assert out["reject_reason"][1].startswith("incomplete: undecodable image (UnidentifiedImageError")
    assert out["reject_reason"][2].startswith("incomplete: no class folder")
    grey = decode_images(batch, base="/r", classes=["red"], size=5, channels=1)["inputs"]
    assert grey.shape == (3, 1, 5, 5) and np.allclose(grey[0], 76 / 255, atol=1 / 255)  # L of red


# --------------------------------------------------------------------------- tables
def records(offset: int, n: int) -> list[dict]:
    return [{"doc": f"d{offset + i}", "text": GOOD[offset + i], "n": i} for i in range(n)]


def write_corpus(root, fmt: str) -> None:
    """Three good files (12 records), one record with a null text and one with an empty text
    in them, and one corrupt file."""
    root.mkdir(parents=True)
    parts = [records(0, 5), records(5, 4), records(9, 3)]
    parts[1].append({"doc": "null", "text": None, "n": 0})
    parts[2].append({"doc": "empty", "text": "", "n": 0})
    for k, rows in enumerate(parts):
        path = root / ("sub" if k == 2 else "") / f"part{k}.{fmt}"
        path.parent.mkdir(exist_ok=True)
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif fmt == "csv":
            import csv

            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, ["doc", "text", "n"])
                w.writeheader()
                for r in rows:  # None -> an empty field, which CSV reads back as null text
                    w.writerow(r)
        else:
            pq.write_table(pa.Table.from_pylist(rows), path)
    bad = root / f"broken.{fmt}"
    if fmt == "jsonl":
        bad.write_text(json.dumps(records(0, 1)[0]) + "\n{\"doc\": \"x\", \"text\": \"unterminated\n")
    elif fmt == "csv":
        bad.write_text("doc,text,n\nd1,fine,1\nd2,too,many,fields,here\n")
    else:
        bad.write_bytes(b"PAR1 this is not a parquet file at all PAR1")
    (root / "_SUCCESS").write_text("")  # marker files are skipped


def shard_texts(run: RunDir, manifest: dict) -> dict[str, bytes]:
    """Each record's text rebuilt from its (single) window: inputs then the last label."""
    out = {}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for row in pq.read_table(run.fs.open_input_file(run.sub(shard["path"]))).to_pylist():
                n = row["n_tokens"]
                assert row["window"] == 0
                x, y = (np.asarray(row[c], dtype=np.int64) for c in ("input_ids", "labels"))
                out[row["path"]] = bytes(x[:n].astype(np.uint8)) + bytes([int(y[n - 1])])
    return out


def _run_data(spec):
    import bigopt

    result = bigopt.run(spec, stages=["data"])
    run = RunDir(result.run_uri)
    return run, run.read_json("data/manifest.json")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_table_corpus_through_the_data_stage(ray_session, tmp_path, fmt):
    write_corpus(tmp_path / "corpus", fmt)
    spec = parse_spec(table_spec(tmp_path, {"kind": "table", "format": fmt,
                                            "path": str(tmp_path / "corpus")}))
    run, manifest = _run_data(spec)
    # 12 good + null + empty records, + the broken file counted as one quarantined row
    assert manifest["rows_in"] == 15 == manifest["rows_kept"] + manifest["rows_rejected"]
    assert manifest["rows_kept"] == 12
    quarantine = {r["path"]: r["reason"] for r in rejected_rows(run, "read")}
    assert quarantine[f"broken.{fmt}"].startswith(f"unreadable: not valid {fmt}")
    # CSV has no null apart from an empty field: both read as an empty text
    null = "incomplete: text is empty" if fmt == "csv" else "incomplete: text is null"
    assert quarantine[f"part1.{fmt}#4"] == null
    assert quarantine[f"sub/part2.{fmt}#3"] == "incomplete: text is empty"
    texts = shard_texts(run, manifest)
    want = {f"part0.{fmt}#{i}": GOOD[i] for i in range(5)}
    want.update({f"part1.{fmt}#{i}": GOOD[5 + i] for i in range(4)})
    want.update({f"sub/part2.{fmt}#{i}": GOOD[9 + i] for i in range(3)})
    assert texts == {k: v.encode() for k, v in want.items()}
    assert manifest["source"]["kind"] == "table" and manifest["source"]["files"] == 4


@pytest.mark.slow
def test_jsonl_on_s3_with_an_id_column(ray_session, s3_server, tmp_path):
    import os

    import boto3

    bucket = s3_server[len("s3://"):]
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for k, rows in enumerate([records(0, 6), records(6, 6)]):
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        client.put_object(Bucket=bucket, Key=f"readers/corpus/part{k}.jsonl", Body=body)
    client.put_object(Bucket=bucket, Key="readers/corpus/bad.jsonl", Body=b"{not json}\n")
    spec = parse_spec(table_spec(tmp_path, {"kind": "table", "format": "jsonl", "id": "doc",
                                            "path": f"{s3_server}/readers/corpus"}))
    run, manifest = _run_data(spec)
    assert manifest["rows_in"] == 13 == manifest["rows_kept"] + manifest["rows_rejected"]
    assert manifest["rows_rejected"] == 1
    (bad,) = rejected_rows(run, "read")
    assert bad["path"] == "bad.jsonl" and bad["reason"].startswith("unreadable: not valid jsonl")
    assert shard_texts(run, manifest) == {f"d{i}": GOOD[i].encode() for i in range(12)}


@pytest.mark.slow
def test_text_tree_on_s3(ray_session, s3_server, tmp_path):
    """A source tree under an S3 prefix: include/exclude as for a local tree, a file that is not
    UTF-8 quarantined by name, every kept file in exactly one split."""
    import os

    import boto3

    bucket = s3_server[len("s3://"):]
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    files = {"a.py": b"def a():\n    return 1\n" * 5, "sub/b.py": b"class B:\n    pass\n" * 9,
             "notes.txt": b"not python\n", "skip/x.py": b"x = 1\n", "bad.py": b"\xff\xfe not utf8"}
    for rel, body in files.items():
        client.put_object(Bucket=bucket, Key=f"readers/tree/{rel}", Body=body)
    spec = parse_spec(spec_dict(tmp_path / "runs", name="tree", train=None, data={
        "source": {"kind": "text_tree", "path": f"{s3_server}/readers/tree/", "include": ["*.py"],
                   "exclude": ["skip/*"], "max_files": None},
        "split": {"val": 0.5}, "context": 16, "steps": []}))
    run, manifest = _run_data(spec)
    assert manifest["rows_in"] == 3 == manifest["rows_kept"] + manifest["rows_rejected"]
    (bad,) = rejected_rows(run, "read")
    assert bad == {**bad, "path": "bad.py", "reason": "not_utf8", "step": "read"}
    where: dict[str, str] = {}
    for name, split in manifest["splits"].items():
        for shard in split["shards"]:
            for path in pq.read_table(run.fs.open_input_file(run.sub(shard["path"])),
                                      columns=["path"]).column("path").to_pylist():
                assert where.setdefault(path, name) == name
    assert set(where) == {"a.py", "sub/b.py"}


def test_text_tree_path_scheme_is_checked_before_ray(tmp_path):
    from bigopt.spec import SpecError

    with pytest.raises(SpecError, match="data.source.path"):
        parse_spec(spec_dict(tmp_path, data={"source": {"kind": "text_tree", "path": "gs://b/x"}}))
    parse_spec(spec_dict(tmp_path, data={"source": {"kind": "text_tree", "path": "s3://b/x"}}))


@pytest.mark.slow
def test_a_missing_text_column_is_a_clear_error(ray_session, tmp_path):
    from bigopt.data.readers import table_rows

    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(0, 3)))
    (root / "b.jsonl").write_text(json.dumps({"doc": "x", "body": "hello"}) + "\n")
    spec = parse_spec(table_spec(tmp_path, {"kind": "table", "format": "jsonl", "path": str(root)}))
    with pytest.raises(SpecError, match=r"data.source.text: no column 'text' in b.jsonl "
                                        r"\(columns: doc, body\)"):
        table_rows(spec.data.source)
    spec = parse_spec(table_spec(tmp_path, {"kind": "table", "format": "jsonl", "id": "key",
                                            "path": str(root / "a.jsonl")}))
    with pytest.raises(SpecError, match=r"data.source.id: no column 'key' in a.jsonl"):
        table_rows(spec.data.source)


# --------------------------------------------------------------------------- image folders
def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_image_folder_through_the_data_stage(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    shades = {"cat": 40, "dog": 128, "emu": 220}  # each class one grey level, so labels show
    for name, shade in shades.items():
        (root / name).mkdir(parents=True)
        for i in range(6):
            size = int(rng.integers(10, 20))  # sizes differ: every image is resized
            pixels = np.full((size, size, 3), shade, dtype=np.uint8)
            (root / name / f"{i}.png").write_bytes(png(pixels))
    (root / "dog" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image: ignored")
    spec = parse_spec(folder_spec(tmp_path, root, model={"kind": "mlp", "in_features": 64,
                                                         "num_classes": 3}, image_size=8))
    run, manifest = _run_data(spec)
    assert manifest["classes"] == ["cat", "dog", "emu"] and manifest["num_classes"] == 3
    assert manifest["rows_in"] == 19 == manifest["rows_kept"] + manifest["rows_rejected"]
    assert manifest["rows_kept"] == 18
    (bad,) = rejected_rows(run, "read")
    assert bad["id"] == "dog/corrupt.png"
    assert bad["reason"].startswith("incomplete: undecodable image (")
    rows = [row for split in manifest["splits"].values() for shard in split["shards"]
            for row in pq.read_table(run.fs.open_input_file(run.sub(shard["path"]))).to_pylist()]
    assert sorted(r["id"] for r in rows) == sorted(f"{c}/{i}.png" for c in shades for i in range(6))
    for row in rows:
        cls = row["id"].split("/")[0]
        assert row["labels"] == ["cat", "dog", "emu"].index(cls)
        x = np.asarray(row["inputs"], dtype=np.float32)
        assert x.shape == (1, 8, 8) and x.dtype == np.float32
        assert np.allclose(x, shades[cls] / 255.0, atol=1 / 255)
    # a model with fewer classes than there are class folders is refused, naming the field
    from bigopt.data.prepare import run_data
    from bigopt.resolve import resolve

    small = parse_spec(folder_spec(tmp_path, root, model={"kind": "mlp", "in_features": 64,
                                                          "num_classes": 2}, image_size=8))
    with pytest.raises(SpecError, match=r"model.num_classes: 2 < the 3 class folders"):
        run_data(resolve(small), RunDir.create(small.storage, small.name).stage("data"))


@pytest.mark.slow
def test_image_folder_on_s3(ray_session, s3_server, tmp_path):
    import os

    import boto3

    bucket = s3_server[len("s3://"):]
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for name, shade in (("b", 200), ("a", 10)):
        for i in range(3):
            client.put_object(Bucket=bucket, Key=f"readers/images/{name}/{i}.jpg",
                              Body=_jpeg(np.full((12, 12, 3), shade, dtype=np.uint8)))
    client.put_object(Bucket=bucket, Key="readers/images/a/bad.jpg", Body=b"\xff\xd8 truncated")
    spec = parse_spec(folder_spec(tmp_path, f"{s3_server}/readers/images", image_size=6))
    run, manifest = _run_data(spec)
    assert manifest["classes"] == ["a", "b"]
    assert manifest["rows_in"] == 7 and manifest["rows_kept"] == 6
    (bad,) = rejected_rows(run, "read")
    assert bad["id"] == "a/bad.jpg" and bad["reason"].startswith("incomplete: undecodable image")
    rows = [row for split in manifest["splits"].values() for shard in split["shards"]
            for row in pq.read_table(run.fs.open_input_file(run.sub(shard["path"]))).to_pylist()]
    assert sorted((r["id"], r["labels"]) for r in rows) == [
        (f"{c}/{i}.jpg", label) for label, c in enumerate("ab") for i in range(3)]


def _jpeg(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()
