"""One rank of tests/models/test_zero_init.py: build models under deepspeed.zero.Init and plainly.

Run as ``python _zero_init_worker.py OUT_DIR`` with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT set (the test starts one process per rank). Writes ``OUT_DIR/rank{RANK}.pt``
with, per case, the gathered ZeRO-3 weights, the plain weights and what each rank held; the
test makes the assertions, so a failure reads as a pytest diff rather than a worker traceback.
"""

import os
import sys

import deepspeed
import deepspeed.ops
import torch

from bigopt.models import build_model
from bigopt.train.engine import model_init_context

#: kind, config, dtype of the ds_config ("fp32" or "bf16"). bf16 is where zero.Init's own init
#: differs most from a plain build (bf16 kernels), so it exercises the replay in base.py.
CASES = {
    "gpt-fp32": ("gpt", dict(n_layer=2, d_model=32, n_head=2, context=32, vocab_size=256), "fp32"),
    "gpt-bf16": ("gpt", dict(n_layer=2, d_model=32, n_head=2, context=32, vocab_size=256), "bf16"),
    "cnn-bf16": ("cnn", dict(image_size=12, stem_channels=8, blocks=[
        {"type": "resnet", "channels": 8, "stride": 1},
        {"type": "dense", "growth": 4, "layers": 2},
        {"type": "transition", "channels": 8},
        {"type": "resnet", "channels": 16, "stride": 2},
    ]), "bf16"),
    "mlp-fp32": ("mlp", dict(in_features=20, hidden=[16, 8], num_classes=5), "fp32"),
}


def ds_config(precision: str) -> dict:
    config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def run_case(kind: str, config: dict, precision: str) -> dict:
    torch.manual_seed(0)
    with model_init_context(ds_config(precision)):
        model = build_model(kind, **config)
    after_zero = torch.rand(4)  # the RNG state the build left behind
    params = list(model.parameters())
    out = {
        "local_data_numel": sum(p.data.numel() for p in params),  # 0: nothing held in full
        "local_partition_numel": sum(p.ds_tensor.numel() for p in params),
        "n_tensors": len(params),
        "all_partitioned": all(hasattr(p, "ds_id") for p in params),
        "num_params": model.num_params(),
        "flops": model.flops_per_sample(),
        "dtypes": sorted({str(p.dtype) for p in params}),
        "buffer_dtypes": {n: str(b.dtype) for n, b in model.named_buffers()},
    }
    with deepspeed.zero.GatheredParameters(params):  # read-only gather of the full weights
        out["zero"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["rng_zero"] = after_zero

    torch.manual_seed(0)
    plain = build_model(kind, **config)
    out["rng_plain"] = torch.rand(4)
    out["plain"] = {n: p.detach().clone() for n, p in plain.named_parameters()}
    out["plain_num_params"] = plain.num_params()
    out["plain_flops"] = plain.flops_per_sample()

    # _init_weights called again after __init__ (outside the build's replay) on both models
    for m in (model, plain):
        torch.manual_seed(1)
        m._init_weights()
    with deepspeed.zero.GatheredParameters(params):
        out["zero_reinit"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["plain_reinit"] = {n: p.detach().clone() for n, p in plain.named_parameters()}
    return out


def main() -> None:
    out_dir = sys.argv[1]
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (deepspeed_shm_comm)
    # in init_distributed when it can: ~60 s on 2 cores the first time. Gloo is all this test
    # needs, so the op is marked unavailable (the same switch DeepSpeed's probe would set).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    results = {name: run_case(*case) for name, case in CASES.items()}
    torch.save(results, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
