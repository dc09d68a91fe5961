"""ONNX export of bigopt models: fp32 with checked parity and dynamic shapes, int8, and measurement.

``export_onnx`` traces the model with ``torch.onnx.export(dynamo=True)`` (``torch.export`` under
the hood, so ``dynamic_shapes``, not the legacy ``dynamic_axes``), checks that the graph's input
really has symbolic batch (and sequence) dimensions, then runs the file in onnxruntime on the
example, on a batch of another size (and a shorter sequence), and on a batch of one, and compares
each with PyTorch. A difference above ``atol`` raises ``ExportParityError`` and leaves no file.

``quantize_onnx_int8`` makes an int8 file with onnxruntime's quantizer. Which method shrinks a
file ~4x at a small accuracy cost depends on the model (``INT8_METHOD``, measured in tests):

* dynamic (weights int8, activations quantized at run time from their observed range):
  MatMul/Gemm models (MLP, GPT). No calibration data; accuracy holds on any input range.
  It also quantizes Conv (``ConvInteger``), but that kernel is ~7x slower than fp32 on CPU.
* static QDQ (weights int8 per output channel, activation ranges calibrated on real batches):
  conv models (CNN). Inputs far outside the calibration range are clipped.

Exported files carry no per-node debug metadata (PyTorch stack traces): it is ~7% of a small
model's file and would otherwise be copied into every quantized node.

onnx and onnxruntime are imported inside the functions that need them, so that
``bigopt.export.executorch`` can share this module's helpers without loading them.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "INT8_METHOD",
    "ExportError",
    "ExportParityError",
    "export_onnx",
    "onnx_accuracy",
    "onnx_latency_ms",
    "onnx_run",
    "quantize_onnx_int8",
]

#: The int8 method per model kind, from measurements (see the module docstring and
#: tests/export/test_onnx.py): static QDQ for conv models, dynamic for MatMul/Gemm ones.
INT8_METHOD: dict[str, Literal["dynamic", "static"]] = {"cnn": "static", "mlp": "dynamic", "gpt": "dynamic"}

#: Weights above this size go to an external-data file beside the .onnx (protobuf's 2 GB cap).
_EXTERNAL_DATA_BYTES = 1536 * 1024 * 1024


class ExportError(RuntimeError):
    """An export produced a file that does not do what was asked (shapes, runtime); none was kept."""


class ExportParityError(ExportError):
    """The exported file's output differs from PyTorch's by more than the tolerance."""

    def __init__(self, what: str, max_abs_diff: float, atol: float, shape: Sequence[int], path: Any) -> None:
        self.max_abs_diff = float(max_abs_diff)
        self.atol = float(atol)
        super().__init__(
            f"{what} output differs from PyTorch: max abs diff {self.max_abs_diff:.6g} > atol "
            f"{self.atol:g} (input shape {list(shape)}); nothing was written to {path}"
        )


# ---------------------------------------------------------------------------------------------
# atomic writes


class _Staging:
    """A temporary directory beside ``final``; ``path`` is where the writer puts the file.

    ``commit()`` moves every file the writer left there (external-data sidecars first, the
    main file last) into ``final``'s directory; leaving the ``with`` block without committing
    deletes them. Files keep their base names, so relative external-data references stay valid.
    """

    def __init__(self, final: str | os.PathLike[str]) -> None:
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".tmp", dir=self.final.parent))
        self.path = self.dir / self.final.name

    def scratch(self) -> Path:
        """A directory for intermediate files that must not be committed."""
        return Path(tempfile.mkdtemp(prefix="scratch.", dir=self.dir))

    def commit(self) -> list[Path]:
        if not self.path.is_file():
            raise ExportError(f"the writer left no file at {self.path}")
        files = [p for p in self.dir.iterdir() if p.is_file() and p != self.path]
        moved = []
        for p in [*files, self.path]:
            target = self.final.parent / p.name
            os.replace(p, target)
            moved.append(target)
        stale = self.final.parent / (self.final.name + ".data")  # a previous export's sidecar
        if stale not in moved and stale.is_file():
            stale.unlink()
        return moved


@contextmanager
def staged(final: str | os.PathLike[str]) -> Iterator[_Staging]:
    """Write into ``staging.path``, check, call ``staging.commit()``; no commit leaves nothing."""
    staging = _Staging(final)
    try:
        yield staging
    finally:
        shutil.rmtree(staging.dir, ignore_errors=True)


def files_bytes(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


# ---------------------------------------------------------------------------------------------
# inputs shared by the ONNX and ExecuTorch exporters


def single_input(example_inputs: Any) -> Tensor:
    """The one input tensor of a bigopt model, from ``(x,)`` or ``x``."""
    if isinstance(example_inputs, Tensor):
        return example_inputs
    if isinstance(example_inputs, tuple | list) and len(example_inputs) == 1 and isinstance(
        example_inputs[0], Tensor
    ):
        return example_inputs[0]
    raise ValueError(
        "example_inputs must be a tuple holding one tensor (bigopt models take one input), got "
        f"{type(example_inputs).__name__}"
        + (f" of length {len(example_inputs)}" if isinstance(example_inputs, tuple | list) else "")
    )


def export_example(
    x: Tensor, *, dynamic_batch: bool, dynamic_seq: bool, max_batch: int | None = None
) -> Tensor:
    """The example to trace with: sizes >= 2 on dynamic axes (torch.export specializes 0 and 1).

    A batch of one is repeated to two rows, a sequence of one to two positions; a batch above
    ``max_batch`` is cut to it.
    """
    x = x.detach()
    if dynamic_seq and x.dim() < 2:
        raise ValueError(f"dynamic_seq needs an input of shape [batch, seq, ...], got {list(x.shape)}")
    if dynamic_batch and x.shape[0] < 2:
        x = x.repeat(2, *([1] * (x.dim() - 1)))
    if max_batch is not None and x.shape[0] > max_batch:
        x = x[:max_batch]
    if dynamic_seq and x.shape[1] < 2:
        x = x.repeat(1, 2, *([1] * (x.dim() - 2)))
    return x.contiguous()


def check_inputs(x: Tensor, *, dynamic_batch: bool, dynamic_seq: bool,
                 max_batch: int | None = None) -> list[tuple[str, Tensor]]:
    """The inputs a file is checked on: the example, a batch of another size (rows reordered),
    a shorter sequence, and a batch of one (each only where that axis is dynamic)."""
    checks = [("example", x)]
    b = x.shape[0]
    if dynamic_batch:
        if max_batch is None or b < max_batch:
            other = torch.cat([x.flip(0), x[:1]])  # b + 1 rows, in another order
        else:
            other = x.flip(0)[: b - 1]
        checks.append(("batch", other.contiguous()))
        if max_batch is not None and max_batch not in (b, other.shape[0]):
            reps = math.ceil(max_batch / b)
            checks.append(("max_batch", x.repeat(reps, *([1] * (x.dim() - 1)))[:max_batch].contiguous()))
    if dynamic_seq:
        checks.append(("seq", x[:, : x.shape[1] - 1].contiguous()))
    if dynamic_batch:
        checks.append(("batch_1", x[:1].contiguous()))
    return checks


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference; NaN where only one side is NaN counts as infinite."""
    if a.shape != b.shape:
        return math.inf
    a, b = a.astype(np.float64), b.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    return float(diff.max()) if diff.size else 0.0


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode, put back in its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def torch_outputs(model: nn.Module, inputs: Iterable[Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(x).detach().float().cpu().numpy() for x in inputs]


def seq_max(model: nn.Module) -> int | None:
    """The longest sequence the model accepts (a GPT's ``context``), if it has one."""
    context = getattr(model, "context", None)
    return int(context) if isinstance(context, int) else None


def _np(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(x)


# ---------------------------------------------------------------------------------------------
# fp32 export


def export_onnx(
    model: nn.Module,
    example_inputs: tuple[Tensor, ...],
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    dynamic_seq: bool = False,
    atol: float = 1e-4,
    input_name: str = "input",
    output_name: str = "logits",
) -> dict[str, Any]:
    """Export ``model`` (eval mode, fp32, on CPU like the example) to ``path``, checked in onnxruntime.

    ``dynamic_batch`` makes axis 0 of the input (and output) symbolic ("batch"), ``dynamic_seq``
    axis 1 ("seq", e.g. a GPT's tokens, bounded by the model's ``context``). The exported graph
    is read back to confirm those axes have a ``dim_param``, then the file runs on the example, a
    batch of another size, a shorter sequence (if ``dynamic_seq``) and a batch of one, and each
    output is compared with PyTorch's. Above ``atol`` (max abs diff) raises
    ``ExportParityError`` and nothing is left at ``path``.

    Returns ``{"path", "bytes", "files", "format": "onnx", "opset", "max_abs_diff", "atol",
    "checked_shapes", "dynamic": {"batch", "seq"}, "inputs", "outputs", "runtime"}``; each of
    ``inputs``/``outputs`` is ``[{"name", "shape", "dtype"}]`` with symbolic axes as names.
    """
    import onnx
    import onnxruntime as ort
    from torch.export import Dim

    x = export_example(single_input(example_inputs), dynamic_batch=dynamic_batch, dynamic_seq=dynamic_seq)
    axes: dict[int, Any] = {}
    if dynamic_batch:
        axes[0] = Dim("batch")
    if dynamic_seq:
        longest = seq_max(model)
        axes[1] = Dim("seq", max=longest) if longest else Dim("seq")
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    external = weight_bytes > _EXTERNAL_DATA_BYTES

    with eval_mode(model), staged(path) as staging:
        program = torch.onnx.export(
            model, (x,), dynamo=True, dynamic_shapes=(axes,) if axes else None, external_data=external,
            input_names=[input_name], output_names=[output_name], verbose=False,
        )
        program.save(str(staging.path), external_data=external)
        _strip_node_metadata(staging.path)

        graph = onnx.load(str(staging.path), load_external_data=False)
        inputs, outputs = _io_specs(graph.graph.input), _io_specs(graph.graph.output)
        wanted = {axis: dim.__name__ for axis, dim in axes.items()}
        _check_dynamic(inputs[0], wanted, "input")
        out_rank = len(outputs[0]["shape"])
        _check_dynamic(outputs[0], {a: n for a, n in wanted.items() if a < out_rank}, "output")

        checks = check_inputs(x, dynamic_batch=dynamic_batch, dynamic_seq=dynamic_seq)
        expected = torch_outputs(model, [c for _, c in checks])
        session = ort.InferenceSession(str(staging.path), providers=["CPUExecutionProvider"])
        worst = 0.0
        for (_, xi), ref in zip(checks, expected, strict=True):
            got = session.run(None, {input_name: _np(xi)})[0]
            diff = max_abs_diff(got, ref)
            worst = max(worst, diff)
            if not diff <= atol:
                raise ExportParityError("ONNX (onnxruntime)", diff, atol, xi.shape, path)
        del session
        files = staging.commit()

    return {
        "path": str(Path(path)),
        "bytes": files_bytes(files),
        "files": [str(p) for p in files],
        "format": "onnx",
        "opset": _opset(graph),
        "max_abs_diff": worst,
        "atol": atol,
        "checked_shapes": [list(c.shape) for _, c in checks],
        "dynamic": {"batch": dynamic_batch, "seq": dynamic_seq},
        "inputs": inputs,
        "outputs": outputs,
        "runtime": f"onnxruntime {ort.__version__}",
    }


def _strip_node_metadata(path: Path) -> None:
    """Drop per-node ``metadata_props`` (the exporter's stack traces), in place."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def strip(graph: Any) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.HasField("g"):
                    strip(attr.g)
                for g in attr.graphs:
                    strip(g)

    strip(model.graph)
    onnx.save(model, str(path))


def _io_specs(values: Iterable[Any]) -> list[dict[str, Any]]:
    import onnx

    specs = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
                 for d in t.shape.dim]
        specs.append({"name": v.name, "shape": shape,
                      "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name})
    return specs


def _check_dynamic(spec: dict[str, Any], wanted: dict[int, str], what: str) -> None:
    for axis, name in wanted.items():
        dim = spec["shape"][axis] if axis < len(spec["shape"]) else None
        if not isinstance(dim, str) or dim == "?":
            raise ExportError(
                f"the exported graph's {what} {spec['name']!r} has shape {spec['shape']}: axis {axis} "
                f"({name}) was asked to be dynamic but is fixed; nothing was written"
            )


def _opset(model: Any) -> int | None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return None


# ---------------------------------------------------------------------------------------------
# int8


class _Batches:
    """onnxruntime's ``CalibrationDataReader`` protocol over a list of arrays."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.name, self.batches, self.i = name, batches, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def quantize_onnx_int8(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    method: Literal["dynamic", "static"],
    calibration: Iterable[np.ndarray | Tensor] | None = None,
    input_name: str | None = None,
    per_channel: bool | None = None,
) -> dict[str, Any]:
    """Quantize an fp32 ONNX file to int8 at ``out_path`` (atomic, like every writer here).

    ``method="dynamic"``: int8 weights, activations quantized at run time (no calibration).
    ``method="static"``: QDQ format, int8 weights (per output channel unless
    ``per_channel=False``) and int8 activations whose ranges are calibrated (min/max) on
    ``calibration``, batches of real preprocessed inputs (a few hundred rows suffice).
    ``INT8_METHOD`` gives the measured choice per model kind. The model is first put through
    onnxruntime's ``quant_pre_process`` (shape inference, graph optimization) where that works.

    The output is loaded and run once to prove it works; int8 is not parity-checked here
    (use ``onnx_accuracy(int8_path, batches, reference=fp32_path)`` for top-1 agreement).
    Returns ``{"path", "bytes", "files", "format": "onnx-int8", "method", "per_channel",
    "fp32_bytes", "ratio", "calibration_batches", "preprocessed"}``.
    """
    import onnx
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if method not in ("dynamic", "static"):
        raise ValueError(f"method must be 'dynamic' or 'static', got {method!r}")
    fp32_path = Path(fp32_path)
    fp32_files = [fp32_path, *[p for p in [fp32_path.with_name(fp32_path.name + ".data")] if p.is_file()]]
    graph = onnx.load(str(fp32_path), load_external_data=False)
    names = [i.name for i in graph.graph.input]
    input_name = input_name or names[0]
    if input_name not in names:
        raise ValueError(f"input_name {input_name!r} is not an input of {fp32_path}; inputs: {names}")
    batches = [_np(b) for b in calibration] if calibration is not None else []
    if method == "static" and not batches:
        raise ValueError("static quantization needs calibration batches (real inputs, preprocessed)")
    per_channel = (method == "static") if per_channel is None else per_channel
    external = any(uses_external_data(t) for t in graph.graph.initializer)

    with staged(out_path) as staging:
        source, preprocessed = _pre_process(fp32_path, staging.scratch() / "pre.onnx", external)
        if method == "dynamic":
            quantize_dynamic(source, staging.path, weight_type=QuantType.QInt8, per_channel=per_channel,
                             use_external_data_format=external)
        else:
            quantize_static(
                source, staging.path, _Batches(input_name, batches), quant_format=QuantFormat.QDQ,
                per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external,
            )
        if preprocessed:
            shutil.rmtree(Path(source).parent, ignore_errors=True)
        _strip_node_metadata(staging.path)
        probe = batches[0] if batches else _zeros_for(graph, input_name)
        out = onnx_run(staging.path, probe, input_name=input_name)
        if not np.all(np.isfinite(out)):
            raise ExportError(f"the int8 model gives non-finite outputs; nothing was written to {out_path}")
        files = staging.commit()

    size, fp32_size = files_bytes(files), files_bytes(fp32_files)
    return {
        "path": str(Path(out_path)),
        "bytes": size,
        "files": [str(p) for p in files],
        "format": "onnx-int8",
        "method": method,
        "per_channel": per_channel,
        "fp32_bytes": fp32_size,
        "ratio": fp32_size / size,
        "calibration_batches": len(batches),
        "preprocessed": preprocessed,
    }


def _pre_process(fp32_path: Path, out: Path, external: bool) -> tuple[str, bool]:
    """onnxruntime's quantization pre-processing; the fp32 file itself if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for skip_symbolic in (False, True):
        try:
            quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=skip_symbolic,
                              save_as_external_data=external, all_tensors_to_one_file=True)
            return str(out), True
        except Exception:  # noqa: BLE001 - symbolic shape inference fails on some graphs
            continue
    return str(fp32_path), False


def _zeros_for(graph: Any, input_name: str) -> np.ndarray:
    spec = next(s for s in _io_specs(graph.graph.input) if s["name"] == input_name)
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec["shape"]]
    return np.zeros(shape, dtype=spec["dtype"])


# ---------------------------------------------------------------------------------------------
# running and measuring


def _session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_run(
    path: str | os.PathLike[str], x: np.ndarray | Tensor, *, input_name: str | None = None
) -> np.ndarray:
    """The first output of the ONNX file at ``path`` for input ``x``, with onnxruntime (CPU)."""
    session = _session(path)
    name = input_name or session.get_inputs()[0].name
    return session.run(None, {name: _np(x)})[0]


def onnx_accuracy(
    path: str | os.PathLike[str],
    batches: Iterable[Any],
    *,
    reference: str | os.PathLike[str] | nn.Module | None = None,
) -> dict[str, Any]:
    """Top-1 accuracy of an ONNX classifier or LM on ``batches``, and agreement with a reference.

    ``batches`` yields ``(x, y)`` (or bare ``x``: then only agreement is measured); logits are
    ``[B, C]`` or ``[B, T, V]`` and every leading position is one prediction. With labels the
    mean cross entropy (``loss``) and ``perplexity`` = exp(loss) come too. ``reference`` (the
    fp32 ONNX file or the PyTorch model) adds ``top1_agreement``: the fraction of predictions
    where both give the same argmax, the measure of an int8 file's faithfulness.
    Returns ``{"rows", "predictions", "accuracy"?, "loss"?, "perplexity"?, "top1_agreement"?}``.
    """
    session = _session(path)
    name = session.get_inputs()[0].name
    ref_session = _session(reference) if isinstance(reference, str | os.PathLike) else None
    rows = predictions = correct = agree = 0
    nll = 0.0
    labelled = False
    for item in batches:
        x, y = item if isinstance(item, tuple | list) and len(item) == 2 else (item, None)
        logits = session.run(None, {name: _np(x)})[0]
        logits = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
        pred = logits.argmax(-1)
        rows += int(np.shape(x)[0])
        predictions += pred.size
        if y is not None:
            labelled = True
            target = _np(y).reshape(-1).astype(np.int64)
            correct += int((pred == target).sum())
            top = logits.max(-1, keepdims=True)
            log_z = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[:, 0]
            nll += float((log_z - logits[np.arange(target.size), target]).sum())
        if reference is not None:
            if ref_session is not None:
                ref = ref_session.run(None, {ref_session.get_inputs()[0].name: _np(x)})[0]
            else:
                with eval_mode(reference), torch.no_grad():
                    ref = reference(torch.as_tensor(_np(x))).numpy()
            agree += int((ref.reshape(-1, ref.shape[-1]).argmax(-1) == pred).sum())
    if predictions == 0:
        raise ValueError("onnx_accuracy got no batches")
    out: dict[str, Any] = {"rows": rows, "predictions": predictions}
    if labelled:
        out["accuracy"] = correct / predictions
        out["loss"] = nll / predictions
        out["perplexity"] = math.exp(min(out["loss"], 700.0))
    if reference is not None:
        out["top1_agreement"] = agree / predictions
    return out


def latency_stats(run: Callable[[], Any], repeats: int, warmup: int) -> dict[str, float]:
    """Median and 90th percentile wall time of ``run()`` in milliseconds, after ``warmup`` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    p90 = times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]
    return {"median": statistics.median(times), "p90": p90, "repeats": repeats}


def onnx_latency_ms(
    path: str | os.PathLike[str], x: np.ndarray | Tensor, repeats: int = 30, warmup: int = 5, threads: int = 1
) -> dict[str, Any]:
    """Latency of one ``run`` on ``x`` with onnxruntime (CPU, ``threads`` intra-op threads).

    Returns ``{"median", "p90", "repeats", "batch", "threads"}`` (milliseconds).
    """
    session = _session(path, threads=threads)
    feed = {session.get_inputs()[0].name: _np(x)}
    stats = latency_stats(lambda: session.run(None, feed), repeats, warmup)
    return {**stats, "batch": int(np.shape(feed[next(iter(feed))])[0]), "threads": threads}
