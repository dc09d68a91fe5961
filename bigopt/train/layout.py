"""Where a training stage keeps its checkpoints, relative to the stage's own folder.

Torch-free, so the pipeline, the reporters and ``--resume latest`` read it cheaply. Every path
here is relative to the ``RunDir`` view a stage was handed (``<run>/train/`` for the train
stage, ``<run>/compress/<variant>/`` for a fine-tuning step): no module names a stage folder.

    <stage>/checkpoints/step_NNNNNN/       one directory per checkpoint (Ray merges the ranks')
        bigopt_complete.json               written once every rank's upload returned
        bigopt_state.json                  the trainer's own state (step, samples, batches)
    <stage>/model.safetensors              consolidated fp32 weights of the final model
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bigopt.runtime import RunDir

CHECKPOINTS = "checkpoints"
STATE_FILE = "bigopt_state.json"
COMPLETE_FILE = "bigopt_complete.json"
WEIGHTS_FILE = "model.safetensors"


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_rel(step: int) -> str:
    """``checkpoints/step_NNNNNN``, relative to the stage folder."""
    return f"{CHECKPOINTS}/{checkpoint_dir_name(step)}"


def step_of(path: str) -> int:
    """The step a ``step_NNNNNN`` checkpoint directory holds (-1 for other names)."""
    match = re.search(r"step_(\d+)/*$", path)
    return int(match.group(1)) if match else -1


def read_marker(fs: Any, path: str) -> dict[str, Any] | None:
    """The completion marker of checkpoint directory ``path`` (inside ``fs``), or None: rank 0
    writes it only after every rank's upload returned, so a directory without a readable one
    is a checkpoint whose upload was cut short (files missing, or not known to be all there)."""
    import json

    try:
        with fs.open_input_stream(f"{path.rstrip('/')}/{COMPLETE_FILE}") as src:
            return json.loads(src.read())
    except (OSError, ValueError):  # no marker, or one torn by a crash mid-write
        return None


def is_complete(fs: Any, path: str) -> bool:
    """Whether checkpoint directory ``path`` has its completion marker (``read_marker``)."""
    return read_marker(fs, path) is not None


def complete_checkpoints(out: RunDir, session: str | None = None) -> list[str]:
    """Paths (inside ``out.fs``) of the checkpoints in stage folder ``out`` that every rank
    finished, oldest first; only those written by ``session`` when given."""
    import pyarrow.fs as pafs

    found = []
    sel = pafs.FileSelector(out.sub(CHECKPOINTS), allow_not_found=True)
    for info in out.fs.get_file_info(sel):
        if info.type != pafs.FileType.Directory or step_of(info.path) < 0:
            continue
        marker = read_marker(out.fs, info.path)
        if marker is not None and (session is None or marker.get("session") == session):
            found.append(info.path)
    return sorted(found, key=step_of)


def latest_checkpoint(out: RunDir) -> str | None:
    """Path (inside ``out.fs``) of the newest complete checkpoint in stage folder ``out``."""
    done = complete_checkpoints(out)
    return done[-1] if done else None
