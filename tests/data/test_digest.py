"""The source digest: order-free, sensitive to every key and byte, the same in a task or a driver."""

from __future__ import annotations

from bigopt.data.digest import dataset_digest, digest_of


def test_digest_ignores_order_and_sees_every_change():
    keys, texts = ["a.py", "b.py", "c.py"], [b"x = 1\n", b"y = 2\n", b""]
    base = digest_of(keys, texts)
    assert digest_of(keys[::-1], texts[::-1]) == base
    assert digest_of(["a.py", "b.py", "d.py"], texts) != base  # a renamed file
    assert digest_of(keys, [b"x = 1\n", b"y = 3\n", b""]) != base  # one byte
    assert digest_of(keys + ["c.py"], texts + [b""]) != base  # a repeated row counts
    assert digest_of(keys[:1], texts[:1]) != base


def test_dataset_digest_equals_the_in_process_one(ray_session):
    rows = [{"path": f"m{i}.py", "text": f"v = {i}\n".encode()} for i in range(300)]
    ds = ray_session.data.from_items(rows, override_num_blocks=7)
    assert dataset_digest(ds, "path", "text") == digest_of([r["path"] for r in rows],
                                                           [r["text"] for r in rows])
