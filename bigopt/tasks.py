"""Task registry: what kind of learning problem a job is, decided once by ``resolve``.

A task owns what used to be inferred in many places from the model class or tensor shapes:
the columns the data stage writes and training reads, the loss, the evaluation metrics and the
lines the report shows. The trainer and the report look the task up by name
(``get_task(job.task)``) and hold no ``if language model`` branches of their own (torchtitan's
train-spec registry, on a small scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100  # labels of padded positions (F.cross_entropy's default ignore_index)


def cross_entropy(output: Any, target: Any) -> Any:
    """Mean cross entropy over every prediction, computed in fp32 (bf16/fp16 logits lose
    precision in the softmax). Flattens leading dims: ``[B, V]`` vs ``[B]`` and ``[B, T, V]``
    vs ``[B, T]``; padded labels (``IGNORE_INDEX``) are left out."""
    import torch.nn.functional as F

    output = output.float()
    return F.cross_entropy(output.reshape(-1, output.size(-1)), target.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def _no_eval_counts(output: Any, target: Any) -> dict[str, float]:
    return {}


def _classifier_counts(output: Any, target: Any) -> dict[str, float]:
    return {"correct": float((output.argmax(-1) == target).sum()), "rows": float(target.numel())}


def _lm_report(result: dict[str, Any]) -> list[str]:
    val = {int(k): v for k, v in result.get("val_losses", {}).items()}
    if len(val) < 2:
        return []
    first, last = val[min(val)], val[max(val)]
    lines = [f"- perplexity {math.exp(first):.2f} -> {math.exp(last):.2f} "
             f"(step {min(val)} -> {max(val)})"]
    if result.get("test_loss") is not None:
        lines.append(f"- test loss {result['test_loss']:.4f} (perplexity "
                     f"{math.exp(result['test_loss']):.2f}, {result['test_rows']} test windows)")
    return lines


def _classifier_report(result: dict[str, Any]) -> list[str]:
    acc = {int(k): v for k, v in result.get("val_accuracy", {}).items()}
    lines = []
    if acc:
        lines.append(f"- **validation accuracy {100 * acc[min(acc)]:.1f} % -> "
                     f"{100 * acc[max(acc)]:.1f} %** (step {min(acc)} -> {max(acc)})")
    if result.get("test_accuracy") is not None:
        lines.append(f"- **test accuracy {100 * result['test_accuracy']:.2f} %** (test loss "
                     f"{result['test_loss']:.4f}, all {result['test_rows']} test rows, final weights)")
    return lines


@dataclass(frozen=True)
class Task:
    name: str
    #: (inputs, targets) columns of the training shards
    columns: tuple[str, str]
    #: loss(output, target) -> scalar tensor; a plain function (DeepSpeed's pipeline calls it)
    loss: Callable[[Any, Any], Any]
    #: eval_counts(output, target) -> sums that are all-reduced and turned into metrics
    eval_counts: Callable[[Any, Any], dict[str, float]]
    #: extra report lines from train/result.json
    report_lines: Callable[[dict[str, Any]], list[str]]
    #: whether a sample is a token window (tokens/s, perplexity, context)
    is_sequence: bool
    #: the validation metric a search optimizes by default, and its direction
    default_metric: tuple[str, str] = ("val_loss", "min")

    def tokens_per_sample(self, context: int | None) -> int:
        return (context or 0) if self.is_sequence else 0

    def test_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics of a whole-split evaluation from summed ``loss``/``rows``/``correct``."""
        out = {"test_loss": sums["loss"] / sums["rows"], "test_rows": int(round(sums["rows"]))}
        if self.default_metric[0] == "val_acc":  # a task that counts correct predictions
            out["test_accuracy"] = sums["correct"] / sums["rows"]
        return out

    def eval_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        """Metrics from all-reduced ``eval_counts`` sums (accuracy for classifiers)."""
        if counts.get("rows"):
            return {"val_acc": counts["correct"] / counts["rows"]}
        return {}


TASKS: dict[str, Task] = {
    "language_model": Task("language_model", ("input_ids", "labels"), cross_entropy,
                           _no_eval_counts, _lm_report, is_sequence=True),
    "classifier": Task("classifier", ("inputs", "labels"), cross_entropy,
                       _classifier_counts, _classifier_report, is_sequence=False,
                       default_metric=("val_acc", "max")),
}

#: the task each model kind trains for
TASK_OF_MODEL = {"gpt": "language_model", "cnn": "classifier", "mlp": "classifier"}
#: the task each data source feeds (a data-only spec has no model section)
TASK_OF_SOURCE = {"text_tree": "language_model", "digits": "classifier", "idx": "classifier",
                  "table": "language_model", "image_folder": "classifier"}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
