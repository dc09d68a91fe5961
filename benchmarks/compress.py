"""Compression evidence on real data, through bigopt's own stages (BENCHMARKS.md section 8).

Everything runs as a user runs it: ``bigopt.run`` with job specs (data, train, compress,
export stages; Ray Train fine-tuning; the driver's measurements), one process, one Ray. The raw
summaries of every run go to ``benchmarks/results/compress.json``.

Rows (Fashion-MNIST: 60k train-* rows, 5 % of them validation; all 10,000 t10k-* rows test):
  * ``lenet``: LeNet-300-100 (784-300-100-10, 266k weights; Han et al. 2015's MLP) trained,
    then gradual magnitude pruning to 90 % (Zhu & Gupta's cubic schedule, fine-tuned), then
    int8 (torchao dynamic PTQ); every variant exported as ONNX, int8 ONNX and .pte;
  * ``ptq`` / ``qat``: the trained LeNet quantized post-training (dynamic, weight-only) and
    with quantization-aware fine-tuning;
  * ``structured``: the 73k-parameter ResNet of jobs/fmnist_cnn.yaml, half its channels
    removed (Torch-Pruning), fine-tuned; CPU latency at batch 1 and 64;
  * ``distill``: the ResNet teaches a 784-64-10 MLP student (T=4, alpha=0.7) vs the same
    student, steps, lr and seed with alpha=0 (hard labels only), seeds 1, 2, 3 (none tuned on);
  * ``gpt``: the quickstart GPT (stdlib code) trained 300 steps, int8 weight-only and dynamic:
    the perplexity change.

    python benchmarks/compress.py                 # ~30-40 min on 2 cores
    python benchmarks/compress.py --only distill  # one part (results merged into the file)
    python benchmarks/compress.py --tables        # benchmarks/results/compress.md from the json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read at `import ray`: loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "compress.json")
FMNIST = "/usr/share/datasets/fashion-mnist"
DISTILL_SEEDS = [1, 2, 3]

DATA = {"source": {"kind": "idx", "path": FMNIST}, "split": {"val": 0.05, "seed": 0}}
TRAIN = {"strategy": "ddp", "precision": "bf16", "optimizer": "adamw", "weight_decay": 0.01,
         "batch_size": 128, "lr": 1e-3, "schedule": {"kind": "cosine", "warmup_steps": 20},
         "log_every": 50, "eval_every": 500, "eval_batches": 6, "checkpoint_every": 0}
LENET = {"kind": "mlp", "in_features": 784, "hidden": [300, 100], "num_classes": 10}
STUDENT = {"kind": "mlp", "in_features": 784, "hidden": [64], "num_classes": 10}
EXPORT = {"formats": ["onnx", "onnx_int8", "pte"], "eval_rows": 10000, "latency_repeats": 30}


def spec(name: str, storage: str, **sections: Any) -> Any:
    from bigopt.spec import parse_spec

    return parse_spec({"name": name, "storage": storage, "cluster": {"num_workers": 2},
                       "data": DATA, **sections})


def run(spec_: Any, stages: list[str], **kw: Any) -> str:
    import bigopt

    started = time.time()
    result = bigopt.run(spec_, stages=stages, console="quiet", **kw)
    print(f"  {spec_.name} {'+'.join(stages)}: {time.time() - started:.0f} s -> {result.run_uri}",
          flush=True)
    return result.run_uri


def summaries(run_uri: str) -> dict[str, Any]:
    out = {}
    for stage in ("compress", "export"):
        path = os.path.join(run_uri, stage, "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                out[stage] = json.load(f)
    result = os.path.join(run_uri, "train", "result.json")
    if os.path.exists(result):
        with open(result) as f:
            r = json.load(f)
        out["train"] = {k: r.get(k) for k in ("steps", "test_accuracy", "test_loss", "val_losses")}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--storage", default="/tmp/bigopt-bench-compress")
    p.add_argument("--only", nargs="*", default=None,
                   choices=["lenet", "ptq", "qat", "structured", "distill", "gpt"])
    p.add_argument("--tables", action="store_true", help="only write the markdown tables")
    p.add_argument("--prune-steps", type=int, default=1000, help="lenet: fine-tuning steps")
    p.add_argument("--distill-lr", type=float, default=3e-3, help="distill: the students' lr")
    p.add_argument("--tag", default="", help="suffix of the result keys (a second recipe)")
    args = p.parse_args()
    if args.tables:
        write_tables()
        return
    parts = set(args.only or ["lenet", "ptq", "qat", "structured", "distill", "gpt"])
    results: dict[str, Any] = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}
    results["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": sys.version.split()[0]}
    results["commands"] = [*results.get("commands", []),
                           "python benchmarks/compress.py " + " ".join(sys.argv[1:])]
    s = args.storage
    started = time.time()
    data = run(spec("fmnist-data", s), ["data"])
    train_from = {"data": data}

    if parts & {"lenet", "ptq", "qat"}:
        lenet = run(spec("lenet", s, model=LENET, train={**TRAIN, "max_steps": 2000}), ["train"],
                    inputs_from=train_from)
        results["lenet_train"] = summaries(lenet)
        frm = {"train": lenet}
        if "lenet" in parts:
            r = run(spec("lenet-prune", s, model=LENET, train={**TRAIN, "max_steps": 2000}, export=EXPORT,
                         compress={"steps": [
                             {"kind": "prune", "method": "magnitude", "sparsity": 0.9,
                              "steps": args.prune_steps, "ramp": 0.6, "frequency": 50, "lr": 1e-3},
                             {"kind": "quantize", "mode": "int8_dynamic"}]}),
                    ["compress", "export"], inputs_from=frm)
            results["lenet" + args.tag] = summaries(r)
        if "ptq" in parts:
            r = run(spec("lenet-ptq", s, model=LENET, train={**TRAIN, "max_steps": 2000},
                         compress={"steps": [{"kind": "quantize", "mode": "int8_dynamic",
                                              "name": "dynamic"}]}),
                    ["compress"], inputs_from=frm)
            results["ptq_dynamic"] = summaries(r)
            r = run(spec("lenet-ptq-w", s, model=LENET, train={**TRAIN, "max_steps": 2000},
                         compress={"steps": [{"kind": "quantize", "mode": "int8_weight_only",
                                              "name": "weight-only"}]}),
                    ["compress"], inputs_from=frm)
            results["ptq_weight_only"] = summaries(r)
        if "qat" in parts:
            r = run(spec("lenet-qat", s, model=LENET, train={**TRAIN, "max_steps": 2000},
                         compress={"steps": [{"kind": "quantize", "mode": "qat", "steps": 400,
                                              "lr": 2e-4}]}),
                    ["compress"], inputs_from=frm)
            results["qat"] = summaries(r)

    if parts & {"structured", "distill"}:
        from bigopt.spec import load_spec

        cnn_spec = load_spec(os.path.join(REPO, "jobs", "fmnist_cnn.yaml"),
                             [f"storage={s}", "train.max_steps=1500", "train.eval_every=500"])
        cnn = run(cnn_spec, ["train"], inputs_from=train_from)
        results["cnn_train"] = summaries(cnn)
        cnn_raw = cnn_spec.model_dump(mode="json", exclude_unset=True)
        if "structured" in parts:
            r = run(spec("cnn-structured", s, model=cnn_raw["model"], train=cnn_raw["train"],
                         export={**EXPORT, "formats": ["onnx", "onnx_int8", "pte"]},
                         compress={"steps": [{"kind": "prune", "method": "structured", "ratio": 0.5,
                                              "steps": 800, "lr": 0.02}]}),
                    ["compress", "export"], inputs_from={"train": cnn})
            results["structured"] = summaries(r)
        if "distill" in parts:
            pairs = []
            for seed in DISTILL_SEEDS:
                row = {}
                for alpha in (0.0, 0.7):
                    r = run(spec(f"distill-a{alpha}-s{seed}", s, model=cnn_raw["model"],
                                 train={**cnn_raw["train"], "seed": seed},
                                 compress={"eval_rows": 10000, "steps": [
                                     {"kind": "distill", "student": STUDENT, "alpha": alpha,
                                      "temperature": 4.0, "steps": 1500, "lr": args.distill_lr}]}),
                            ["compress"], inputs_from={"train": cnn})
                    rows = summaries(r)["compress"]["rows"]
                    row[f"alpha_{alpha}"] = rows[-1]["metrics"]["accuracy"]
                    row["teacher"] = rows[0]["metrics"]["accuracy"]
                pairs.append({"seed": seed, **row})
                print(f"  distill seed {seed}: {row}", flush=True)
            diffs = [p_["alpha_0.7"] - p_["alpha_0.0"] for p_ in pairs]
            results["distill" + args.tag] = {
                "pairs": pairs, "mean_diff": statistics.mean(diffs), "lr": args.distill_lr,
                "se_diff": statistics.stdev(diffs) / len(diffs) ** 0.5, "seeds": DISTILL_SEEDS}

    if "gpt" in parts:
        from bigopt.spec import load_spec

        gpt_spec = load_spec(os.path.join(REPO, "jobs", "quickstart.yaml"),
                             [f"storage={s}", "train.max_steps=300"])
        gpt = run(gpt_spec, ["data", "train"])
        raw = gpt_spec.model_dump(mode="json", exclude_unset=True)
        r = run(load_spec_dict({**raw, "name": "gpt-int8", "export": {
            "formats": ["onnx", "onnx_int8"], "eval_rows": 200, "variants": "all"},
            "compress": {"eval_rows": 200, "latency_repeats": 10, "steps": [
                {"kind": "quantize", "mode": "int8_weight_only", "name": "weight-only"}]}}),
                ["compress"], inputs_from={"train": gpt})
        results["gpt_weight_only"] = summaries(r)
        r = run(load_spec_dict({**raw, "name": "gpt-int8d", "export": None,
                                "compress": {"eval_rows": 200, "latency_repeats": 10, "steps": [
                                    {"kind": "quantize", "mode": "int8_dynamic", "name": "dynamic"}]}}),
                ["compress"], inputs_from={"train": gpt})
        results["gpt_dynamic"] = summaries(r)

    results["seconds"] = round(time.time() - started)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    print(f"wrote {RESULTS} ({results['seconds']} s)")
    write_tables()


def _q(metrics: dict[str, Any]) -> str:
    if "perplexity" in metrics:
        return f"{metrics['perplexity']:.3f}"
    return f"{100 * metrics['accuracy']:.2f} %"


def write_tables() -> None:
    """Markdown tables of every measured variant and file, from compress.json."""
    results = json.load(open(RESULTS))
    lines = ["# Compression evidence (generated by `python benchmarks/compress.py --tables`)", "",
             f"Machine: {results.get('machine')}; commands: "
             + ", ".join(f"`{c}`" for c in ([results["command"]] if "command" in results else [])
                         + results.get("commands", [])), "",
             "## PyTorch variants (driver-measured: test split, one CPU thread, median latency)", "",
             "| run | variant | quality | params | non-zero | size (bytes) | latency b1 (ms) | b64 (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for key, value in sorted(results.items()):
        rows = value.get("compress", {}).get("rows", []) if isinstance(value, dict) else []
        for r in rows:
            lat = r["latency_ms"]
            lines.append(f"| {key} | {r['variant']} | {_q(r['metrics'])} | {r['params']:,} | "
                         f"{r['nonzero_params']:,} | {r['size_bytes']:,} | "
                         f"{lat['batch_1']['median']:.3f} | {lat['batch_64']['median']:.3f} |")
    lines += ["", "## Exported files (each run by its own runtime on the test split)", "",
              "| run | variant | format | quality | PyTorch | size (bytes) | latency b1 (ms) | b64 (ms) |",
              "|---|---|---|---|---|---|---|---|"]
    for key, value in sorted(results.items()):
        rows = value.get("export", {}).get("rows", []) if isinstance(value, dict) else []
        for r in rows:
            if "error" in r:
                lines.append(f"| {key} | {r['variant']} | {r['format']} | failed: {r['error'][:80]} |||||")
                continue
            lat = r["latency_ms"]
            lines.append(f"| {key} | {r['variant']} | {r['format']} | {_q(r['metrics'])} | "
                         f"{_q(r['pytorch'])} | {r['bytes']:,} | {lat['batch_1']['median']:.3f} | "
                         f"{lat['batch_64']['median']:.3f} |")
    for key in sorted(k for k in results if k.startswith("distill")):
        d = results[key]
        lines += ["", f"## Distillation `{key}` (paired by seed; student 784-64-10 MLP, SGD lr "
                  f"{d.get('lr', 3e-3)}, 1,500 steps; teacher the ResNet)", "",
                  "| seed | teacher | student alone (alpha 0) | distilled (alpha 0.7, T 4) | difference |",
                  "|---|---|---|---|---|"]
        for p_ in d["pairs"]:
            alone, distilled = p_["alpha_0.0"], p_["alpha_0.7"]
            lines.append(f"| {p_['seed']} | {100 * p_['teacher']:.2f} % | {100 * alone:.2f} % | "
                         f"{100 * distilled:.2f} % | {100 * (distilled - alone):+.2f} |")
        lines.append(f"\nMean paired difference {100 * d['mean_diff']:+.2f} points, standard error "
                     f"{100 * d['se_diff']:.2f} (seeds {d['seeds']}).")
    out = os.path.join(os.path.dirname(RESULTS), "compress.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


def load_spec_dict(raw: dict[str, Any]) -> Any:
    from bigopt.spec import parse_spec

    return parse_spec({k: v for k, v in raw.items() if v is not None})


if __name__ == "__main__":
    main()
