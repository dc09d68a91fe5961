"""ExecuTorch export (``.pte`` for edge devices, XNNPACK delegate), checked through ExecuTorch.

``export_pte`` runs ``torch.export.export`` with dynamic batch (and sequence) dimensions bounded
above (ExecuTorch plans memory for the largest shape, so the bound is what the file reserves at
load time), lowers with ``to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])``,
and runs the ``.pte`` through ``executorch.runtime`` on the example, on batches of other sizes
(including the bound) and a shorter sequence, comparing each with PyTorch. A difference above
``atol`` raises ``ExportParityError`` and leaves no file.

Workaround (ExecuTorch 1.5 + PyTorch 2.13): while XNNPACK's channels-last pass re-runs each
convolution on fake tensors, PyTorch's CPU conv-backend heuristic (``use_mkldnn``: batch >= 16)
guards on the symbolic batch and narrows its range to ``batch < 16``, so memory planning gave
any conv model a batch bound of 15 whatever was asked. That guard only picks a CPU kernel and
means nothing for XNNPACK, so the requested ranges are put back before memory planning; the
check at the bound then proves the file runs there (``workarounds`` in the result says when it
was applied). If dynamic export still fails, the model is exported with the example's fixed
shape and the result says so (``dynamic``, ``fallback_reason``).

ExecuTorch is optional (``pip install 'bigopt[edge]'``) and imported only inside functions.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bigopt.export.onnx import (
    ExportError,
    ExportParityError,
    check_inputs,
    eval_mode,
    export_example,
    files_bytes,
    latency_stats,
    max_abs_diff,
    seq_max,
    single_input,
    staged,
    torch_outputs,
)

__all__ = [
    "ExportError", "ExportParityError", "executorch_version", "export_pte", "pte_latency_ms", "pte_run",
]


def _require_executorch() -> Any:
    try:
        import executorch  # noqa: F401
        from executorch import version
    except ImportError as e:
        raise ImportError(
            "ExecuTorch is not installed; .pte export needs the optional extra: "
            "pip install 'bigopt[edge]'"
        ) from e
    return version


def executorch_version() -> str:
    """The installed ExecuTorch version (ImportError naming the extra if it is missing)."""
    return str(_require_executorch().__version__)


def export_pte(
    model: nn.Module,
    example_inputs: tuple[Tensor, ...],
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    dynamic_seq: bool = False,
    max_batch: int = 64,
    max_seq: int | None = None,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Export ``model`` (eval, fp32) to an XNNPACK ``.pte`` at ``path``, checked through ExecuTorch.

    ``dynamic_batch`` makes axis 0 dynamic in ``[1, max_batch]``; ``dynamic_seq`` axis 1 in
    ``[1, max_seq]`` (default: the model's ``context``). The file is run by ExecuTorch's runtime
    on the example, a batch of another size, ``max_batch`` rows, a shorter sequence and one row
    (where dynamic) and compared with PyTorch; above ``atol`` raises ``ExportParityError`` and
    nothing is left at ``path``.

    Returns ``{"path", "bytes", "files", "format": "pte", "backend": "xnnpack", "max_abs_diff",
    "atol", "checked_shapes", "dynamic": {"batch", "seq"}, "limits": {"batch"?, "seq"?},
    "inputs", "outputs", "planned_input_shape", "workarounds", "fallback_reason"?, "runtime"}``.
    """
    version = _require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torch.export import Dim

    if dynamic_batch and max_batch < 2:
        raise ValueError(f"max_batch must be >= 2 for a dynamic batch, got {max_batch}")
    x = single_input(example_inputs)
    if dynamic_seq:
        max_seq = max_seq or seq_max(model) or x.shape[1]
    x = export_example(x, dynamic_batch=dynamic_batch, dynamic_seq=dynamic_seq,
                       max_batch=max_batch if dynamic_batch else None)
    if dynamic_seq and x.shape[1] > max_seq:
        x = x[:, :max_seq].contiguous()

    def lower(axes: dict[int, Any]) -> tuple[Any, list[str]]:
        ep = torch.export.export(model, (x,), dynamic_shapes=(axes,) if axes else None)
        ranges = _input_ranges(ep)
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        return _restore_and_plan(edge, ranges) if ranges else (edge.to_executorch(), [])

    axes: dict[int, Any] = {}
    if dynamic_batch:
        axes[0] = Dim("batch", min=1, max=max_batch)
    if dynamic_seq:
        axes[1] = Dim("seq", min=1, max=max_seq)
    fallback = None
    with eval_mode(model), staged(path) as staging:
        try:
            program, workarounds = lower(axes)
        except Exception as e:  # noqa: BLE001 - recorded, and the fixed-shape export is checked
            if not axes:
                raise
            fallback = f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]
            warnings.warn(f"dynamic-shape .pte export failed ({fallback}); exporting the fixed input shape "
                          f"{list(x.shape)} instead", RuntimeWarning, stacklevel=2)
            dynamic_batch = dynamic_seq = False
            program, workarounds = lower({})
        staging.path.write_bytes(program.buffer)
        del program

        limit = max_batch if dynamic_batch else None
        checks = check_inputs(x, dynamic_batch=dynamic_batch, dynamic_seq=dynamic_seq, max_batch=limit)
        expected = torch_outputs(model, [c for _, c in checks])
        method = _load_method(staging.path)
        planned = list(method.metadata.input_tensor_meta(0).sizes()) if _has_meta(method) else None
        worst = 0.0
        for (_, xi), ref in zip(checks, expected, strict=True):
            try:
                got = method.execute([xi])[0].detach().float().numpy()
            except RuntimeError as e:
                raise ExportError(
                    f"ExecuTorch could not run the exported program on input shape {list(xi.shape)} "
                    f"(planned input shape {planned}): {e}; nothing was written to {path}"
                ) from e
            diff = max_abs_diff(got, ref)
            worst = max(worst, diff)
            if not diff <= atol:
                raise ExportParityError("ExecuTorch (.pte)", diff, atol, xi.shape, path)
        del method
        files = staging.commit()

    names = {0: "batch"} if dynamic_batch else {}
    if dynamic_seq:
        names[1] = "seq"
    bounds = (("batch", max_batch, dynamic_batch), ("seq", max_seq, dynamic_seq))
    limits = {name: bound for name, bound, on in bounds if on}
    by_label = {label: out for (label, _), out in zip(checks, expected, strict=True)}
    result: dict[str, Any] = {
        "path": str(Path(path)),
        "bytes": files_bytes(files),
        "files": [str(p) for p in files],
        "format": "pte",
        "backend": "xnnpack",
        "max_abs_diff": worst,
        "atol": atol,
        "checked_shapes": [list(c.shape) for _, c in checks],
        "dynamic": {"batch": dynamic_batch, "seq": dynamic_seq},
        "limits": limits,
        "inputs": [{"name": "input", "shape": _symbolic(list(x.shape), names), "dtype": _dtype(x)}],
        "outputs": [{"name": "output", "shape": _output_shape(by_label), "dtype": "float32"}],
        "planned_input_shape": planned,
        "workarounds": workarounds,
        "runtime": f"executorch {version.__version__}",
    }
    if fallback:
        result["fallback_reason"] = fallback
    return result


def _input_ranges(ep: Any) -> dict[Any, Any]:
    """The value range of every symbolic input dimension, as ``torch.export`` left them."""
    ranges = {}
    for node in ep.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, Tensor):
            for size in val.shape:
                env = getattr(getattr(size, "node", None), "shape_env", None)
                known = getattr(env, "var_to_range", None)
                if isinstance(size, torch.SymInt) and isinstance(known, dict):
                    for sym in size.node.expr.free_symbols:
                        if sym in known:
                            ranges[sym] = (env, known[sym])
    return ranges


def _restore_and_plan(edge: Any, ranges: dict[Any, Any]) -> tuple[Any, list[str]]:
    """Undo ranges narrowed during lowering (see the module docstring), then plan memory."""
    applied = []
    for sym, (env, wanted) in ranges.items():
        now = env.var_to_range.get(sym)
        if now is not None and now != wanted:
            env.var_to_range[sym] = wanted
            applied.append(
                f"restored the range of {sym} from [{now.lower}, {now.upper}] to [{wanted.lower}, "
                f"{wanted.upper}] after XNNPACK lowering (a CPU conv-backend guard had narrowed it)"
            )
    return edge.to_executorch(), applied


def _load_method(path: str | os.PathLike[str]) -> Any:
    from executorch.runtime import Runtime

    return Runtime.get().load_program(Path(path)).load_method("forward")


def _has_meta(method: Any) -> bool:
    try:
        return method.metadata.num_inputs() >= 1
    except Exception:  # noqa: BLE001 - metadata accessors differ across ExecuTorch releases
        return False


def _symbolic(shape: list[int], names: dict[int, str]) -> list[int | str]:
    return [names.get(i, d) for i, d in enumerate(shape)]


def _output_shape(outputs: dict[str, np.ndarray]) -> list[int | str]:
    """Output axes that follow the input's batch / sequence, named like them."""
    shape: list[int | str] = list(outputs["example"].shape)
    for label, name in (("batch", "batch"), ("seq", "seq")):
        other = outputs.get(label)
        if other is None or other.ndim != len(shape):
            continue
        for i, (a, b) in enumerate(zip(outputs["example"].shape, other.shape, strict=True)):
            if a != b:
                shape[i] = name
    return shape


def _dtype(x: Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def _tensor(x: np.ndarray | Tensor) -> Tensor:
    return (x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))).detach().cpu().contiguous()


def pte_run(path: str | os.PathLike[str], x: np.ndarray | Tensor) -> np.ndarray:
    """The first output of the ``.pte`` at ``path`` for input ``x``, run by ExecuTorch."""
    _require_executorch()
    return _load_method(path).execute([_tensor(x)])[0].detach().numpy()


def pte_latency_ms(
    path: str | os.PathLike[str], x: np.ndarray | Tensor, repeats: int = 30, warmup: int = 5, threads: int = 1
) -> dict[str, Any]:
    """Latency of one ``forward`` on ``x`` through ExecuTorch's runtime (XNNPACK).

    ``threads`` sets ExecuTorch's process-wide threadpool (``_unsafe_reset_threadpool``; call
    it when no other ``.pte`` is running). Returns ``{"median", "p90", "repeats", "batch",
    "threads"}`` (milliseconds).
    """
    _require_executorch()
    from executorch.extension.pybindings import portable_lib

    if threads and getattr(portable_lib, "_threadpool_get_thread_count", lambda: threads)() != threads:
        reset = getattr(portable_lib, "_unsafe_reset_threadpool", None)
        if reset is not None:
            reset(threads)
    method = _load_method(path)
    xt = _tensor(x)
    stats = latency_stats(lambda: method.execute([xt]), repeats, warmup)
    return {**stats, "batch": int(xt.shape[0]), "threads": threads}
