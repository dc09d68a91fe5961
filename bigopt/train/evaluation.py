"""Evaluation inside the training loop: the validation loss and the task's metrics at each
eval, and the whole test split once after the last step. Functions of the ``Trainer`` (its
engine, layout, task and data), kept apart from the loop that calls them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bigopt.data.ingest import epoch_batches, model_input

if TYPE_CHECKING:
    from bigopt.train.loop import Trainer


@torch.no_grad()
def evaluate(trainer: Trainer) -> float:
    """Mean validation loss over ``eval_batches`` batches per data-parallel rank, plus the
    task's metrics (accuracy for classifiers) in ``val_metrics``."""
    train = trainer.train_spec
    dp, dp_rank = trainer.layout.dp, trainer.layout.dp_rank(trainer.rank)
    if trainer._val_batches is None:
        # The same first batches every time: evals are comparable across steps, and
        # holding them in memory avoids starting a Ray Data execution per eval.
        val = epoch_batches(trainer.val_data, batch_size=train.batch_size, seed=0, dp=dp,
                            dp_rank=dp_rank, columns=trainer.columns, device=trainer.device,
                            float_dtype=trainer.input_dtype)
        trainer._val_batches = [next(val) for _ in range(train.eval_batches)]
    trainer.engine.eval()
    losses, counts = [], {}
    if trainer.layout.pp_enabled:
        val = iter(trainer._val_batches)
        for _ in range(max(1, train.eval_batches // trainer.micro_batches)):
            losses.append(float(trainer.engine.eval_batch(data_iter=val)))
    else:
        for x, y in trainer._val_batches:
            out = trainer.engine(x)
            losses.append(trainer.task.loss(out, y).item())
            for k, v in trainer.task.eval_counts(out, y).items():
                counts[k] = counts.get(k, 0.0) + v
    trainer.engine.train()
    if counts:
        summed = {k: trainer.all_reduce_mean(v) for k, v in sorted(counts.items())}
        trainer.val_metrics[trainer.step] = trainer.task.eval_metrics(summed)
    value = trainer.all_reduce_mean(sum(losses) / len(losses))
    trainer.val_losses[trainer.step] = value
    return value


@torch.no_grad()
def evaluate_test(trainer: Trainer) -> dict[str, float]:
    """The whole test split once (every row, batches dealt by data-parallel rank):
    ``test_loss`` and ``test_rows``, plus ``test_accuracy`` for classifiers. Empty with no
    test split, and under pipeline parallelism (whose engine evaluates whole micro-batch
    groups only)."""
    if trainer.test_data is None or trainer.layout.pp_enabled:
        return {}
    dp, dp_rank = trainer.layout.dp, trainer.layout.dp_rank(trainer.rank)
    x_col, y_col = trainer.columns
    sums = {"loss": 0.0, "rows": 0.0, "correct": 0.0}
    trainer.engine.eval()
    batches = trainer.test_data.iter_torch_batches(batch_size=trainer.train_spec.batch_size,
                                                drop_last=False)
    mine, first = 0, None
    for i, batch in enumerate(batches):
        if i % dp != dp_rank:
            continue
        x, y = batch[x_col], batch[y_col].long()
        x = model_input(x, trainer.input_dtype).to(trainer.device)
        y = y.to(trainer.device)
        out = trainer.engine(x)
        mine, first = mine + 1, first if first is not None else x
        counts = trainer.task.eval_counts(out, y)
        rows = counts.get("rows", float(y.numel()))
        sums["loss"] += trainer.task.loss(out, y).item() * rows
        sums["rows"] += rows
        sums["correct"] += counts.get("correct", 0.0)
    # Every rank runs as many forwards as the busiest (ZeRO-3 gathers parameters, DDP may
    # sync buffers, in collectives): a rank dealt fewer batches repeats one, uncounted.
    most = torch.tensor([mine], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        most = most.to(trainer.device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    for _ in range(int(most.item()) - mine):
        if first is None:  # no batch at all here: a one-row stand-in of the model's input
            first = model_input(trainer.engine.module.example_input(1, device=trainer.device)[0],
                                trainer.input_dtype)
        trainer.engine(first)
    trainer.engine.train()
    world = torch.distributed.get_world_size()
    total = {k: trainer.all_reduce_mean(v) * world for k, v in sums.items()}  # sums over ranks
    if not total["rows"]:
        return {}
    return trainer.task.test_metrics(total)
