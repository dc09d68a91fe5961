"""Models built under deepspeed.zero.Init (ZeRO-3): partitioned from the start, same weights.

The 2-rank test starts two real processes (gloo on 127.0.0.1) that each run
``_zero_init_worker.py``: every case is built with ``torch.manual_seed(0)`` inside
``model_init_context(ds_config)`` and again plainly, and the gathered ZeRO-3 weights must be
bit-identical to the plain ones (rounded to the config's dtype). The other tests fake a
partitioned parameter (the attributes DeepSpeed sets) to check the counting code alone.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

import pytest
import torch

from bigopt.models import CNN, GPT, MLP, LayeredModel
from bigopt.models.base import full_numel, full_shape, is_partitioned
from bigopt.train.engine import model_init_context

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("config", [
    None, {}, {"zero_optimization": {"stage": 0}}, {"zero_optimization": {"stage": 2}},
    {"zero_optimization": None}, {"bf16": {"enabled": True}},
])
def test_model_init_context_is_a_no_op_below_zero3(config) -> None:
    assert isinstance(model_init_context(config), contextlib.nullcontext)


def _fake_partition(model: LayeredModel) -> LayeredModel:
    """Make every parameter look like a ZeRO-3 partitioned one: empty data plus ds_* sizes."""
    for i, p in enumerate(model.parameters()):
        p.ds_id, p.ds_shape, p.ds_numel = i, p.shape, p.numel()
        p.data = torch.empty(0, dtype=p.dtype)
    return model


SMALL = {
    "gpt": lambda: GPT(vocab_size=32, context=16, n_layer=2, n_head=2, d_model=16),
    "cnn": lambda: CNN(image_size=12, stem_channels=8),
    "mlp": lambda: MLP(in_features=20, hidden=(16, 8), num_classes=5),
}


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_counts_and_flops_use_full_sizes_of_partitioned_params(kind: str) -> None:
    plain = SMALL[kind]()
    shapes = [p.shape for p in plain.parameters()]
    expected = (plain.num_params(), plain.flops_per_sample())
    model = _fake_partition(SMALL[kind]())
    assert all(is_partitioned(p) and p.numel() == 0 for p in model.parameters())
    assert [full_shape(p) for p in model.parameters()] == shapes
    assert sum(full_numel(p) for p in model.parameters()) == expected[0]
    # flops: a forward pass is impossible on empty weights, so it runs on a meta-device twin
    assert (model.num_params(), model.flops_per_sample()) == expected
    if kind == "gpt":
        assert model.num_params(non_embedding=True) == plain.num_params(non_embedding=True)


def test_flops_of_a_partitioned_model_use_the_rng_like_a_plain_one() -> None:
    # the example batch is drawn on the CPU either way, so the RNG stream does not depend on
    # whether the model was built under zero.Init
    plain, fake = SMALL["cnn"](), _fake_partition(SMALL["cnn"]())
    torch.manual_seed(1)
    plain.flops_per_sample()
    a = torch.rand(3)
    torch.manual_seed(1)
    fake.flops_per_sample()
    assert torch.equal(torch.rand(3), a)


@pytest.fixture(scope="module")
def zero3_results(tmp_path_factory) -> list[dict]:
    """Run _zero_init_worker.py on 2 ranks; one result dict per rank."""
    out = tmp_path_factory.mktemp("zero_init")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(WORLD), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen([sys.executable, os.path.join(HERE, "_zero_init_worker.py"), str(out)],
                         env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


CASES = ["gpt-fp32", "gpt-bf16", "cnn-bf16", "mlp-fp32"]


@pytest.mark.slow  # starts 2 DeepSpeed processes: ~5-10 s on 2 cores, shared by the tests below
@pytest.mark.parametrize("case", CASES)
def test_zero3_init_weights_are_bit_identical_to_a_plain_build(zero3_results, case) -> None:
    for rank, results in enumerate(zero3_results):
        r = results[case]
        assert r["all_partitioned"]
        assert list(r["zero"]) == list(r["plain"])
        for name, plain in r["plain"].items():
            zero = r["zero"][name]
            # the same fp32 values; under a bf16 config rounded as DeepSpeed rounds a plain model
            expected = plain.to(zero.dtype)
            assert zero.dtype == (torch.bfloat16 if case.endswith("bf16") else torch.float32)
            assert torch.equal(zero, expected), f"rank {rank} {case}: {name} differs"
            # and so does _init_weights called again later (GPT's re-init, a no-op for the others)
            assert torch.equal(r["zero_reinit"][name], r["plain_reinit"][name].to(zero.dtype))
        # and the build leaves the RNG where a plain build leaves it
        assert torch.equal(r["rng_zero"], r["rng_plain"]), f"rank {rank} {case}: RNG state"
        if case.startswith("cnn"):  # BatchNorm statistics stay fp32, as in a plain build
            assert {d for n, d in r["buffer_dtypes"].items() if "running" in n} == {"torch.float32"}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_zero3_init_holds_about_half_the_model_per_rank(zero3_results, case) -> None:
    total = zero3_results[0][case]["plain_num_params"]
    held = [results[case]["local_partition_numel"] for results in zero3_results]
    for rank, results in enumerate(zero3_results):
        r = results[case]
        assert r["local_data_numel"] == 0  # no parameter is held in full after the build
        # each tensor is padded to a multiple of the world size: at most WORLD - 1 extra each
        assert total / WORLD <= held[rank] <= total / WORLD + r["n_tensors"], (rank, held, total)
        # counts and FLOPs see the full model although every rank holds half of it
        assert (r["num_params"], r["flops"]) == (total, r["plain_flops"])
    assert sum(held) >= total
