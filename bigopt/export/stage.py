"""The export stage: the chosen model(s) as files an edge device or a server runs without bigopt.

For each variant (the compress stage's, or the input model when there was none) and each format
in ``export.formats``, one folder ``<run>/export/<variant>/<format>/`` holding the file and its
``model_card.json``:

* ``onnx``: ``torch.onnx.export(dynamo=True)`` with a dynamic batch (and sequence, for the
  GPT), checked against PyTorch with onnxruntime (fails beyond ``export.atol``, keeping nothing);
* ``onnx_int8``: onnxruntime's quantization of that file: static QDQ calibrated on training
  rows for convolutional models, dynamic for MLPs and the GPT (what shrinks each ~4x, measured);
* ``pte``: ExecuTorch (XNNPACK), checked through ExecuTorch's runtime.

Every file is then measured with its own runtime on the test split (val without one):
accuracy or perplexity, size, batch-1 and batch-64 latency. With ``export.budget`` the stage
names the file to ship: the most accurate one within the size and latency budget.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import numpy as np

from bigopt.artifacts import DataArtifact, ExportArtifact, ModelArtifact, read_artifact_at
from bigopt.export.spec import ExportSpec
from bigopt.resolve import ResolvedJob
from bigopt.runtime import RunDir
from bigopt.stages import StageOptions

log = logging.getLogger("bigopt")

CARD_FILE = "model_card.json"
SUMMARY_FILE = "summary.json"
FILES = {"onnx": "model.onnx", "onnx_int8": "model.int8.onnx", "pte": "model.pte"}
CARD_FORMAT = {"onnx": "onnx", "onnx_int8": "onnx-int8", "pte": "pte"}
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                        "Sneaker", "Bag", "Ankle boot"]


def chosen_models(model: ModelArtifact, spec: ExportSpec) -> list[ModelArtifact]:
    """The model artifacts to export: the compress stage's input and variants (all), the final
    one, or those named; the input model itself when there was no compress stage."""
    if not model.variants:
        return [model]
    variants = [v for v in (read_artifact_at(uri) for uri in model.variants)
                if isinstance(v, ModelArtifact)]
    if spec.variants == "final":
        return [model]
    if spec.variants == "all":
        first = variants[0].parent
        source = read_artifact_at(first) if first else None
        return ([source] if isinstance(source, ModelArtifact) else []) + variants
    by_name = {v.variant: v for v in variants if isinstance(v, ModelArtifact)}
    missing = [n for n in spec.variants if n not in by_name]
    if missing:
        raise ValueError(f"export.variants: no variant {missing[0]!r}; variants: {', '.join(by_name)}")
    return [by_name[n] for n in spec.variants]


def preprocessing(data: DataArtifact) -> tuple[dict[str, Any], list[str] | None]:
    """What raw inputs go through before the model (the card's ``preprocessing``) and the
    label names, from the data artifact's manifest."""
    from bigopt.runtime import filesystem_for

    fs, path = filesystem_for(data.manifest)
    with fs.open_input_stream(path) as f:
        manifest = json.loads(f.read())
    source = manifest.get("source", {})
    from bigopt.tasks import get_task

    if get_task(data.task).is_sequence:
        tok = dict(data.tokenizer or {"kind": "bytes", "vocab_size": 256})
        how = ("UTF-8 bytes of the text, each byte one token id (0-255)" if tok.get("kind") == "bytes"
               else "ids from the Hugging Face tokenizers BPE in tokenizer.json")
        return {"input": "int64 token ids [batch, seq], seq <= context", "tokenizer": tok,
                "how": how, "context": data.context, "output": "next-token logits"}, None
    kind = source.get("kind")
    prep = {"layout": "NCHW" if kind in ("idx", "image_folder") else "N x features",
            "scale": "pixel / 255 (float32 in [0, 1]); no mean/std normalization",
            "source": kind}
    if kind == "digits":
        prep.update(layout="N x 1 x 8 x 8 (an MLP flattens it itself)",
                    scale="scikit-learn digits pixel values (0-16) / 16, float32")
    classes = int(manifest.get("classes", 10))
    labels = FASHION_MNIST_LABELS if kind == "idx" else [str(i) for i in range(classes)]
    return prep, labels


def _quality(metrics: dict[str, Any]) -> tuple[str, float]:
    if "perplexity" in metrics:
        return "perplexity", float(metrics["perplexity"])
    return "accuracy", float(metrics["accuracy"])


def _evaluate(run_fn: Any, batches: list[tuple[Any, Any]], sequence: bool) -> dict[str, float]:
    """Accuracy (classifier) or perplexity (language model) of ``run_fn(x) -> logits``."""
    import math

    import torch
    import torch.nn.functional as F

    correct = total = 0
    nll, tokens = 0.0, 0
    for x, y in batches:
        logits = torch.from_numpy(np.asarray(run_fn(x.numpy()))).float()
        if sequence:
            nll += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                         ignore_index=-100, reduction="sum"))
            tokens += int((y != -100).sum())
        else:
            correct += int((logits.argmax(-1) == y).sum())
            total += int(y.numel())
    return {"perplexity": math.exp(nll / tokens)} if sequence else {"accuracy": correct / total}


def export_variant(model_art: ModelArtifact, formats: list[str], evaluation: Any, data: DataArtifact,
                   spec: ExportSpec, out: RunDir, prep: dict[str, Any], labels: list[str] | None,
                   calibration: list[np.ndarray]) -> list[dict[str, Any]]:
    """Every format of one variant: files, cards, measurements (a failing format is recorded
    with its error, nothing of it kept)."""

    from bigopt.export.card import ModelCard
    from bigopt.export.onnx import INT8_METHOD, ExportParityError, export_onnx, quantize_onnx_int8
    from bigopt.load import load_model

    sequence = evaluation.task.is_sequence
    # the variant's float weights: torchao int8 is PyTorch's own format; the files carry
    # their runtime's int8 (onnx_int8) instead
    model = load_model(model_art, transforms=False)
    reference = evaluation.metrics(model)  # the PyTorch fp32 figure every file is compared with
    example = (evaluation.inputs(2),)
    kind = model_art.arch["kind"]
    name = model_art.variant or model_art.stage
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bigopt-export-") as tmp:
        fp32_onnx: tuple[str, dict[str, Any]] | None = None
        for fmt in formats:
            local = os.path.join(tmp, fmt, FILES[fmt])
            os.makedirs(os.path.dirname(local), exist_ok=True)
            row: dict[str, Any] = {"variant": name, "format": fmt, "model": model_art.artifact_uri}
            try:
                if fmt in ("onnx", "onnx_int8") and fp32_onnx is None:
                    target = local if fmt == "onnx" else os.path.join(tmp, "fp32.onnx")
                    fp32_onnx = (target, export_onnx(model, example, target, dynamic_batch=True,
                                                     dynamic_seq=sequence, atol=spec.atol))
                if fmt == "onnx":
                    assert fp32_onnx is not None
                    result = fp32_onnx[1]
                elif fmt == "onnx_int8":
                    assert fp32_onnx is not None
                    method = INT8_METHOD.get(kind, "dynamic")
                    result = quantize_onnx_int8(fp32_onnx[0], local, method=method,
                                                calibration=calibration if method == "static" else None)
                    result.update(path=local, format="onnx-int8", inputs=fp32_onnx[1]["inputs"],
                                  outputs=fp32_onnx[1]["outputs"])
                else:
                    from bigopt.export.executorch import export_pte

                    result = export_pte(model, example, local, dynamic_batch=True,
                                        dynamic_seq=sequence, atol=spec.atol)
                run_fn, latency_fn = _runtime(fmt, local)
                latency = {f"batch_{b}": latency_fn(evaluation.inputs(b), spec.latency_repeats)
                           for b in (1, 64)}
                quality = _evaluate(run_fn, evaluation.batches_of(64), sequence)
                diff = result.get("max_abs_diff")
                parity: dict[str, Any] = {"max_abs_diff": diff,
                                          "atol": spec.atol if diff is not None else None}
                if fmt == "onnx_int8" and not sequence:
                    from bigopt.export.onnx import onnx_accuracy

                    assert fp32_onnx is not None
                    agreement = onnx_accuracy(local, [x.numpy() for x, _ in evaluation.batches_of(64)],
                                              reference=fp32_onnx[0])
                    parity = {"top1_agreement": agreement.get("top1_agreement"),
                              "rows": evaluation.rows, "split": evaluation.split}
                card = ModelCard.from_export(
                    {**result, "path": local, "format": CARD_FORMAT[fmt]},
                    preprocessing=prep, labels=labels,
                    metrics={"values": quality, "split": evaluation.split, "rows": evaluation.rows},
                    latency_ms=latency, parity=parity,
                    source={"model": model_art.artifact_uri, "variant": name, "run": model_art.run,
                            "pytorch_fp32": reference})
                folder = out.stage(name).stage(fmt)
                with open(local, "rb") as f:
                    folder.write_bytes(FILES[fmt], f.read())
                if sequence and data.tokenizer.get("uri"):
                    _copy_tokenizer(data.tokenizer["uri"], folder)
                folder.write_text(CARD_FILE, json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
                row.update(file=folder.uri_of(FILES[fmt]), card=folder.uri_of(CARD_FILE),
                           bytes=int(result["bytes"]), metrics=quality, pytorch=reference,
                           latency_ms=latency, parity=parity, params=model_art.params)
                log.info("export: %s %s: %.0f kB, %s, %.3f ms at batch 1", name, fmt,
                         result["bytes"] / 1e3, _describe(quality),
                         latency["batch_1"]["median"])
            except ExportParityError:
                # a file that computes something else than the model: the stage fails (the
                # message has the measured difference); nothing of this file was written
                raise
            except Exception as exc:  # an op a runtime lacks: recorded, the others go on
                row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                log.warning("export: %s %s failed: %s", name, fmt, row["error"])
            rows.append(row)
    return rows


def _runtime(fmt: str, path: str) -> tuple[Any, Any]:
    """(run(x: ndarray) -> logits, latency(x: tensor, repeats) -> ms) of a file's own runtime."""
    import torch

    if fmt == "pte":
        from bigopt.export.executorch import pte_latency_ms, pte_run

        return (lambda x: pte_run(path, torch.from_numpy(x)),
                lambda x, n: pte_latency_ms(path, x, repeats=n))
    from bigopt.export.onnx import onnx_latency_ms, onnx_run

    return (lambda x: onnx_run(path, x), lambda x, n: onnx_latency_ms(path, x.numpy(), repeats=n))


def _describe(quality: dict[str, float]) -> str:
    name, value = _quality(quality)
    return f"perplexity {value:.2f}" if name == "perplexity" else f"accuracy {100 * value:.2f} %"


def _copy_tokenizer(uri: str, folder: RunDir) -> None:
    src_dir, _, name = uri.rpartition("/")
    src = RunDir(src_dir)
    with src.fs.open_input_stream(src.sub(name)) as f:
        folder.write_bytes(name, f.read())


def pick(rows: list[dict[str, Any]], spec: ExportSpec) -> dict[str, Any] | None:
    """The file to ship: the best quality within ``export.budget`` (size, batch-1 latency)."""
    budget = spec.budget
    ok = [r for r in rows if "error" not in r]
    if budget is not None:
        if budget.max_bytes is not None:
            ok = [r for r in ok if r["bytes"] <= budget.max_bytes]
        if budget.max_latency_ms is not None:
            ok = [r for r in ok if r["latency_ms"]["batch_1"]["median"] <= budget.max_latency_ms]
    if not ok:
        return None
    name, _ = _quality(ok[0]["metrics"])
    best = max if name == "accuracy" else min
    return best(ok, key=lambda r: (_quality(r["metrics"])[1], -r["bytes"]) if name == "accuracy"
                else (_quality(r["metrics"])[1], r["bytes"]))


def export_stage(job: ResolvedJob, inputs: dict[str, Any], out: RunDir,
                 options: StageOptions) -> ExportArtifact:
    """The export stage (stage table entry)."""
    from bigopt.compress.stage import EvalData

    spec = job.spec.export
    assert spec is not None
    model: ModelArtifact = inputs["model"]
    data: DataArtifact = inputs["data"]
    evaluation = EvalData(data, spec.eval_rows)
    calibration = _calibration(data, spec.calibration_rows)
    prep, labels = preprocessing(data)
    rows: list[dict[str, Any]] = []
    for variant in chosen_models(model, spec):
        if any(t.get("mode") in ("int8_dynamic", "int8_weight_only") for t in variant.transforms):
            log.info("export: %s is torchao int8 (PyTorch's own format); its file form is the "
                     "onnx_int8 of the variant it came from", variant.variant)
            continue
        rows += export_variant(variant, list(spec.formats), evaluation, data, spec, out, prep,
                               labels, calibration)
    if not any("error" not in r for r in rows):
        raise RuntimeError("export: no file was exported: " + "; ".join(
            f"{r['variant']} {r['format']}: {r.get('error')}" for r in rows))
    chosen = pick(rows, spec)
    out.write_json(SUMMARY_FILE, {"rows": rows, "chosen": chosen, "eval_split": evaluation.split,
                                  "eval_rows": evaluation.rows,
                                  "budget": spec.budget.model_dump() if spec.budget else None})
    out.write_bytes("tradeoff.png", tradeoff_plot(rows, chosen))
    if chosen is not None:
        log.info("export: ship %s %s (%.0f kB, %s)", chosen["variant"], chosen["format"],
                 chosen["bytes"] / 1e3, _describe(chosen["metrics"]))
    return ExportArtifact(stage=out.name, run=out.parent.uri, uri=out.uri, task=model.task,
                          files=[{k: r.get(k) for k in ("variant", "format", "file", "card", "bytes",
                                                         "error")} for r in rows],
                          chosen=f"{chosen['variant']}/{chosen['format']}" if chosen else None)


def _calibration(data: DataArtifact, rows: int) -> list[np.ndarray]:
    """Training rows (preprocessed as the model sees them) that calibrate static int8."""
    import torch

    from bigopt.runtime import filesystem_for
    from bigopt.train.stage import read_split_in_driver

    fs, path = filesystem_for(data.splits["train"].uri)
    ds = read_split_in_driver(fs, path, [data.columns[0]]).limit(rows)
    out = []
    for batch in ds.iter_torch_batches(batch_size=32, drop_last=False):
        x = batch[data.columns[0]]
        out.append((x if torch.is_floating_point(x) else x.long()).numpy())
    return out


def tradeoff_plot(rows: list[dict[str, Any]], chosen: dict[str, Any] | None) -> bytes:
    from bigopt.plotting import figure, png

    fig, axes = figure(10, 3.8, ncols=2)
    ok = [r for r in rows if "error" not in r]
    name = _quality(ok[0]["metrics"])[0] if ok else "accuracy"
    scale = 100 if name == "accuracy" else 1
    markers = {"onnx": "o", "onnx_int8": "s", "pte": "^"}
    for ax, xkey in zip(axes, ("size", "latency"), strict=True):
        for fmt, marker in markers.items():
            pts = [r for r in ok if r["format"] == fmt]
            if not pts:
                continue
            xs = [r["bytes"] / 1e3 if xkey == "size" else r["latency_ms"]["batch_1"]["median"] for r in pts]
            ys = [scale * _quality(r["metrics"])[1] for r in pts]
            ax.scatter(xs, ys, marker=marker, label=fmt)
            for x, y, r in zip(xs, ys, pts, strict=True):
                ax.annotate(r["variant"], (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        if chosen is not None:
            x = chosen["bytes"] / 1e3 if xkey == "size" else chosen["latency_ms"]["batch_1"]["median"]
            ax.scatter([x], [scale * _quality(chosen["metrics"])[1]], s=200, facecolors="none",
                       edgecolors="red", label="to ship")
        ax.set_xscale("log")
        ax.set_xlabel("file size (kB)" if xkey == "size" else "CPU latency, batch 1 (ms)")
        ax.set_ylabel(name + (" (%)" if scale == 100 else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return png(fig)


def report_section(out: RunDir, artifact: ExportArtifact) -> list[str]:
    summary = RunDir(artifact.uri).read_json(SUMMARY_FILE)
    rows = summary["rows"]
    ok = [r for r in rows if "error" not in r]
    name = _quality(ok[0]["metrics"])[0] if ok else "accuracy"
    lines = ["## Export", "",
             f"Each file run by its own runtime on {summary['eval_rows']} rows of the "
             f"{summary['eval_split']} split (CPU, one thread, median latency).", "",
             f"| variant | format | {name} | PyTorch fp32 | size (kB) | params | latency b1 (ms) | "
             "b64 (ms) | parity |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['format']} | failed: {r['error'][:120]} |||||||")
            continue
        q, ref = _quality(r["metrics"])[1], _quality(r["pytorch"])[1]
        fmt = (lambda v: f"{100 * v:.2f} %") if name == "accuracy" else (lambda v: f"{v:.2f}")
        parity = r["parity"]
        par = (f"max diff {parity['max_abs_diff']:.1e}" if parity.get("max_abs_diff") is not None
               else f"top-1 agreement {100 * parity['top1_agreement']:.1f} %"
               if parity.get("top1_agreement") is not None else "")
        lines.append(f"| {r['variant']} | {r['format']} | {fmt(q)} | {fmt(ref)} | "
                     f"{r['bytes'] / 1e3:.1f} | {r['params'] or ''} | "
                     f"{r['latency_ms']['batch_1']['median']:.3f} | "
                     f"{r['latency_ms']['batch_64']['median']:.2f} | {par} |")
    chosen, budget = summary.get("chosen"), summary.get("budget")
    if chosen is not None:
        within = (" within the budget " + ", ".join(f"{k} {v}" for k, v in (budget or {}).items()
                                                   if v is not None and k != "metric")) if budget else ""
        lines += ["", f"**To ship{within}: `{chosen['variant']}` as {chosen['format']}** "
                      f"({chosen['bytes'] / 1e3:.1f} kB, {_describe(chosen['metrics'])}, "
                      f"{chosen['latency_ms']['batch_1']['median']:.3f} ms at batch 1): `{chosen['file']}`"]
    elif budget:
        lines += ["", f"**No file fits the budget {budget}.**"]
    lines += ["", f"![{name} against size and latency]({out.name}/tradeoff.png)", ""]
    return lines
