"""Training metrics as a component: the loop hands over raw numbers, this owns the maths.

``MetricsProcessor`` turns step timings into ``samples_per_s``, ``tokens_per_s``,
``data_wait_frac`` (time blocked on the input pipeline / step time), achieved FLOP/s and MFU
where the device's peak is known, and decides when to log. Sinks write the rows: a JSONL sink
for the stage folder's ``metrics.jsonl`` (rank 0 only) and stdout.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from bigopt.runtime import RunDir

log = logging.getLogger("bigopt")

# Dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12,
              "V100": 125e12}


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name.upper()), None)


class MetricsSink(Protocol):
    def log(self, step: int, values: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """``metrics.jsonl`` in the stage folder, local or S3.

    On local disk every row is appended and flushed at once, so a killed worker loses no row
    and a restarted run's repeated steps stay visible. S3 objects cannot be appended to: rows
    are buffered and the object rewritten at most every ``flush_every_s`` seconds, before each
    checkpoint and on close.
    """

    def __init__(self, run: RunDir, rel: str = "metrics.jsonl", flush_every_s: float = 5.0):
        self.run, self.rel, self.flush_every_s = run, rel, flush_every_s
        self.lines: list[str] = []
        self._last_flush = 0.0
        self._local = None
        if run.is_local:
            os.makedirs(os.path.dirname(run.sub(rel)), exist_ok=True)
            self._local = open(run.sub(rel), "a")  # a resumed run continues its file
        elif run.exists(rel):
            self.lines = [ln + "\n" for ln in run.read_text(rel).splitlines() if ln.strip()]

    def log(self, step: int, values: dict[str, Any]) -> None:
        line = json.dumps({"step": step, **values}) + "\n"
        if self._local is not None:
            self._local.write(line)
            self._local.flush()
            return
        self.lines.append(line)
        if time.time() - self._last_flush > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self._local is not None:
            self._local.flush()
            return
        self.run.write_text(self.rel, "".join(self.lines))
        self._last_flush = time.time()

    def close(self) -> None:
        self.flush()
        if self._local is not None:
            self._local.close()


class ConsoleSink:
    """Progress lines on stdout (Ray streams worker output to the driver and job logs)."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps

    def log(self, step: int, values: dict[str, Any]) -> None:
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()
                 if k in ("loss", "val_loss", "lr", "samples_per_s", "data_wait_frac", "loss_scale")}
        log.info("step %d/%d %s", step, self.max_steps, " ".join(f"{k}={v}" for k, v in shown.items()))

    def close(self) -> None:
        pass


@dataclass
class MetricsProcessor:
    """Aggregates per-step timings between log points."""

    sinks: list[MetricsSink]
    log_every: int
    samples_per_step: int  # global: micro-batch x micro-batches x data-parallel ranks
    tokens_per_sample: int = 0
    flops_per_sample: float = 0.0
    peak_flops_total: float | None = None  # all devices together
    _window: dict[str, float] = field(default_factory=lambda: {"steps": 0, "time": 0.0, "wait": 0.0,
                                                               "loss": 0.0})

    def should_log(self, step: int, last: bool = False) -> bool:
        return last or step == 1 or step % self.log_every == 0

    def record(self, step: int, *, loss: float, step_time: float, data_wait: float, lr: float,
               last: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Add one step; returns (and writes) the logged row when this step is a log point."""
        w = self._window
        w["steps"] += 1
        w["time"] += step_time
        w["wait"] += data_wait
        w["loss"] += loss
        if not self.should_log(step, last):
            return None
        samples_per_s = self.samples_per_step * w["steps"] / max(w["time"], 1e-9)
        row: dict[str, Any] = {
            "loss": w["loss"] / w["steps"],
            "lr": lr,
            "samples_per_s": samples_per_s,
            "data_wait_frac": w["wait"] / max(w["time"], 1e-9),
            "step_time_s": w["time"] / w["steps"],
        }
        if self.tokens_per_sample:
            row["tokens_per_s"] = samples_per_s * self.tokens_per_sample
        if self.flops_per_sample:
            row["flops_per_s"] = samples_per_s * self.flops_per_sample
            if self.peak_flops_total:
                row["mfu"] = row["flops_per_s"] / self.peak_flops_total
        row.update(extra or {})
        self._window = {"steps": 0, "time": 0.0, "wait": 0.0, "loss": 0.0}
        self.write(step, row)
        return row

    def write(self, step: int, row: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(step, row)

    def flush(self) -> None:
        for sink in self.sinks:
            getattr(sink, "flush", lambda: None)()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
