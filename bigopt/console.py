"""What a person sees while ``bigopt run`` works: one progress bar per stage and a few summary
lines; everything else (Ray's, Ray Data's, DeepSpeed's and the workers' logs, warnings) goes to
``<run>/logs/``, shown on the console only with ``-v`` or, as the tail of the failing log,
when a stage fails.

``quiet_console(run)`` is the driver's side (the CLI turns it on; a library caller keeps its
own logging). ``redirect_worker_output(path)`` is the training workers' side: their stdout
and stderr (Python and C-level, e.g. DeepSpeed's and gloo's prints) go to a file in the same
folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

from bigopt.runtime import RunDir

log = logging.getLogger("bigopt")

LOGS = "logs"
DRIVER_LOG = "driver.log"
#: the loggers whose console output is moved to the log file (Ray's own, Ray Data's, ...)
NOISY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "deepspeed", "py.warnings",
                 "torch", "filelock", "urllib3", "botocore", "numexpr")


def log_dir(run: RunDir) -> str:
    """A local folder for ``run``'s logs: ``<run>/logs`` on local disk; for an S3 run dir a
    local folder named after the run (logs are appended line by line, which S3 cannot do)."""
    if run.is_local:
        path = run.sub(LOGS)
    else:
        path = os.path.join(os.path.expanduser("~/.cache/bigopt/logs"), run.path.replace("/", "_"))
    os.makedirs(path, exist_ok=True)
    return path


class _ConsoleFilter(logging.Filter):
    """Only bigopt's own records reach the console; everything reaches the file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "bigopt" or record.name.startswith("bigopt.")


@contextlib.contextmanager
def quiet_console(run: RunDir, *, verbose: bool = False) -> Iterator[str]:
    """Route logging to ``<run>/logs/driver.log``; the console keeps bigopt's lines (all of
    them with ``verbose``). Yields the log folder."""
    folder = log_dir(run)
    global _console
    saved_fds: list[int] = []
    if not verbose:
        # Everything written to file descriptors 1 and 2 (prints from C++ libraries:
        # onnxruntime, ExecuTorch, gloo; Python warnings; Ray's own lines) goes to the driver
        # log; bigopt's lines and bars keep a duplicate of the original stderr.
        sys.stdout.flush()
        sys.stderr.flush()
        saved_fds = [os.dup(1), os.dup(2)]
        _console = os.fdopen(os.dup(saved_fds[1]), "w", buffering=1)
        log_fd = os.open(os.path.join(folder, DRIVER_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
    file_handler = logging.FileHandler(os.path.join(folder, DRIVER_LOG))
    file_handler.setLevel(logging.INFO)  # Ray Data logs every operator at DEBUG
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    saved = [(h, h.filters[:]) for h in root.handlers]
    logging.captureWarnings(True)  # warnings.warn(...) -> the py.warnings logger -> the file
    root.addHandler(file_handler)
    global _file_handler
    _file_handler = file_handler
    saved_streams = []
    if not verbose:
        for handler, _ in saved:
            handler.addFilter(_ConsoleFilter())
            if isinstance(handler, logging.StreamHandler) and _console is not None:
                saved_streams.append((handler, handler.setStream(_console)))
        import warnings

        warnings.simplefilter("default")  # shown once each, and only in the file
    moved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
    if not verbose:
        for name in NOISY_LOGGERS:
            logger = logging.getLogger(name)
            # Ray installs its own console handlers on its loggers: keep them off the console
            moved.append((logger, logger.handlers[:], logger.propagate))
            logger.handlers = [file_handler]
            logger.propagate = False
    try:
        yield folder
    finally:
        root.removeHandler(file_handler)
        for handler, filters in saved:
            handler.filters = filters
        for logger, handlers, propagate in moved:
            logger.handlers, logger.propagate = handlers, propagate
        logging.captureWarnings(False)
        _file_handler = None
        file_handler.close()
        for handler, stream in saved_streams:
            handler.setStream(stream)
        if saved_fds:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            if _console is not None:
                _console.close()
            _console = None


#: the open driver log of the current ``quiet_console``
_file_handler: logging.Handler | None = None
#: the console (the original stderr) while a quiet console sends fds 1 and 2 to the log
_console: Any = None


def console_stream() -> Any:
    """Where bars and console lines go: the real console, also under a quiet console."""
    return _console if _console is not None else sys.stderr


def silence_ray_loggers() -> None:
    """Within a quiet ``quiet_console``, after ``import ray`` and again after ``ray.init``: Ray
    (re)installs console handlers on its loggers; point them at the driver's log instead."""
    handler = _file_handler
    if handler is None:
        return
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False


def redirect_worker_output(path: str) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C-level prints too)
    to ``path``, appending. Called by a training worker when the console is quiet."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def failing_log_tails(folder: str, lines: int = 30) -> str:
    """The last lines of the most recently written worker logs (what a failure printed)."""
    try:
        files = [os.path.join(folder, f) for f in os.listdir(folder) if f != DRIVER_LOG]
    except OSError:
        return ""
    files.sort(key=os.path.getmtime, reverse=True)
    parts = []
    for path in files[:2]:
        text = tail(path, lines)
        if text.strip():
            parts.append(f"--- last lines of {path} ---\n{text}")
    return "\n".join(parts)


def progress_bar(total: int | None, desc: str, unit: str) -> Any:
    """A tqdm bar on stderr (one line; redrawn in place on a terminal)."""
    from tqdm.auto import tqdm

    stream = console_stream()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True,
                mininterval=1.0, file=stream, disable=False)


class MetricsFollower:
    """Follows a stage folder's ``metrics.jsonl`` from the driver (rank 0 of the workers writes
    it) and moves a steps bar with the latest loss: the train stage's progress on the console
    without forwarding any worker output."""

    def __init__(self, out: RunDir, total: int, desc: str = "train", every_s: float = 2.0):
        self.out, self.total, self.every_s = out, total, every_s
        self.bar = progress_bar(total, desc, "step")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.last: dict[str, Any] = {}

    def __enter__(self) -> MetricsFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._poll()
        self.bar.close()

    def _run(self) -> None:
        # poll fast until the first optimizer step (its line is the start-up figure users
        # watch), then every few seconds
        while not self._stop.wait(0.25 if not self.last else self.every_s):
            self._poll()

    def _poll(self) -> None:
        try:
            if not self.out.exists("metrics.jsonl"):
                return
            lines = [ln for ln in self.out.read_text("metrics.jsonl").splitlines() if ln.strip()]
        except (OSError, ValueError):
            return
        if not lines:
            return
        try:
            row = json.loads(lines[-1])
        except ValueError:  # a line being written
            return
        first = not self.last
        self.last.update(row)
        step = int(row.get("step", 0))
        if first:
            # the file's first row, not its last: fast steps can write several between polls
            try:
                earliest = json.loads(lines[0])
            except ValueError:
                earliest = row
            self.bar.clear()
            log.info("%s: step %d/%d, the first optimizer step (loss %.4g)", self.bar.desc,
                     int(earliest.get("step", step)), self.total,
                     float(earliest.get("loss", float("nan"))))
        self.bar.n = min(step, self.total)
        shown = {k: f"{self.last[k]:.4g}" for k in ("loss", "val_loss", "samples_per_s")
                 if isinstance(self.last.get(k), (int, float))}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.refresh()

