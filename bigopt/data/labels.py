"""The ``labels`` cleaning step: malformed labels and suspected label errors in a classifier's
source rows.

1. Malformed or unknown labels (null, not an integer, negative, ``>= num_classes``) are
   rejected first, with reason ``bad_label: <value> (...)``.
2. Suspected label errors are found by confident learning (Northcutt et al., JAIR 2021) with
   cleanlab's ``find_label_issues``: a quick model is trained with K-fold cross-validation
   (``step.folds``), so every row gets class probabilities from a model that never saw it;
   cleanlab's confident joint estimates how many rows are mislabeled, and that many
   rows, lowest probability of their given label first, are flagged (``FILTER_BY``).
   Features are the flattened pixels, PCA-reduced to ``PCA_DIMS`` when wider; the model is a
   scikit-learn ``LogisticRegression`` (``model: logistic``), a one-hidden-layer
   ``MLPClassifier`` (``model: mlp``, stronger and slower), a small torch CNN on the images
   (``model: cnn``, ``cnn_epochs`` per fold; slow on CPU), or a list of these, whose
   out-of-fold probabilities are averaged (``model: [cnn, mlp]``: the most precise, measured).
   ``action: flag`` keeps every row and records the flagged keys in ``details``;
   ``action: drop`` rejects them with reason ``label_error: given 3, predicted 5 (p=0.97)``.

Scale: the features and labels are collected to the driver (a 60,000 x 784 float32 matrix is
188 MB; the PCA-reduced one 24 MB) and fitted there; the folds themselves run as Ray tasks,
one per fold, on the PCA features put once into the object store. Data far larger than the
driver's memory would need a streamed PCA / incremental model instead (not done here).

Deterministic for a fixed ``ctx.seed``: rows are ordered by key (then label) before folding,
PCA, folds and models are all seeded, and Ray workers run single-threaded BLAS.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from bigopt.data.steps import StepContext, StepOutput

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

STEP_NAME = "labels"
#: images wider than this many pixels are PCA-reduced to it before fitting
PCA_DIMS = 100
#: quick models: "logistic" and "mlp" (scikit-learn, on PCA features), "cnn" (torch, on images)
MODELS = ("logistic", "mlp", "cnn")
#: training epochs of the "cnn" model per fold
CNN_EPOCHS = 4
#: cleanlab's rule: how many rows the confident joint estimates as mislabeled, taken lowest
#: self-confidence (probability of the given label) first. Measured on Fashion-MNIST with 5 %
#: flipped labels (benchmarks/results/label_errors.md), it beat cleanlab's default
#: "prune_by_noise_rate" on both recall and precision (MLP: 95 % / 66 % against 92 % / 49 %)
FILTER_BY = "low_self_confidence"
#: how many flagged rows ``details["examples"]`` lists
MAX_EXAMPLES = 10
#: at most this many flagged keys are listed in ``details["flagged_keys"]`` (flag action)
MAX_FLAGGED_KEYS = 100_000


def label_problem(value: Any, num_classes: int | None) -> str:
    """Reject reason for one label value ('' when it is a usable class id)."""
    if value is None:
        return "bad_label: None (missing)"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f"bad_label: {value!r} (not an integer)"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or not float(value).is_integer():
            return "bad_label: None (missing)" if math.isnan(value) else \
                f"bad_label: {value!r} (not an integer)"
        value = int(value)
    if value < 0:
        return f"bad_label: {value} (negative)"
    if num_classes is not None and value >= num_classes:
        return f"bad_label: {value} (not in 0..{num_classes - 1})"
    return ""


def _step_where(step: Any, field: str = "kind") -> str:
    """``data.steps[i].<field>``; the runner passes no index, so ``i`` unless the step has one."""
    index = getattr(step, "index", None)
    return f"data.steps[{index if index is not None else 'i'}].{field}"


def _content_matrix(col: pa.ChunkedArray, n: int, name: str) -> tuple[np.ndarray, tuple]:
    """([n, features] float32, one row's shape) from an Arrow tensor column (or a list column)."""
    parts, shape = [], ()
    for chunk in col.chunks:
        try:
            arr = chunk.to_numpy(zero_copy_only=False)
        except TypeError:
            arr = chunk.to_numpy()
        if arr.dtype == object:  # variable-shaped tensors or nested lists
            rows = [np.asarray(v, dtype=np.float32) for v in arr]
            if len({r.shape for r in rows}) > 1:
                raise ValueError(f"the labels step needs images of one shape; column {name!r} "
                                 f"holds shapes {sorted({r.shape for r in rows})[:3]}...")
            arr = np.stack(rows) if rows else np.zeros((0, 0), np.float32)
        shape = shape or tuple(arr.shape[1:])
        parts.append(arr.reshape(len(arr), -1).astype(np.float32, copy=False))
    out = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    assert len(out) == n, (len(out), n)
    return out, shape


def _collect(ds: ray.data.Dataset, key: str, content: str, label: str):
    """Keys, labels (python values) and flattened content of every row, on the driver."""
    keys: list[Any] = []
    labels: list[Any] = []
    mats: list[np.ndarray] = []
    shape: tuple = ()
    for batch in ds.select_columns([key, content, label]).iter_batches(
            batch_format="pyarrow", batch_size=4096):
        keys += batch[key].to_pylist()
        labels += batch[label].to_pylist()
        mat, row_shape = _content_matrix(batch[content], batch.num_rows, content)
        mats.append(mat)
        shape = shape or row_shape
    widths = {m.shape[1] for m in mats if len(m)}
    if len(widths) > 1:
        raise ValueError(f"the labels step needs images of one shape; column {content!r} holds "
                         f"{sorted(widths)} pixels per row")
    x = np.concatenate([m for m in mats if len(m)]) if widths else np.zeros((0, 0), np.float32)
    return keys, labels, x, shape


def _fit_fold(x, y, train_idx, test_idx, num_classes: int, model: str, seed: int,
              cnn_epochs: int = CNN_EPOCHS, flip: bool = False) -> np.ndarray:
    """Out-of-fold class probabilities [len(test_idx), num_classes] of one fold."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    if model == "cnn":
        return _cnn_fold(x, y, train_idx, test_idx, num_classes, seed, epochs=cnn_epochs, flip=flip)
    if model == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, batch_size=256,
                            learning_rate_init=1e-3, max_iter=25, random_state=seed)
    else:
        clf = LogisticRegression(C=1.0, max_iter=300, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x[train_idx], y[train_idx])
    proba = np.zeros((len(test_idx), num_classes), dtype=np.float64)
    # a class missing from this fold's training rows gets probability 0
    proba[:, clf.classes_] = clf.predict_proba(x[test_idx])
    return proba


def _cnn_fold(x, y, train_idx, test_idx, num_classes: int, seed: int, epochs: int = CNN_EPOCHS,
              batch: int = 128, flip: bool = False) -> np.ndarray:
    """A small CNN (two 3x3 conv layers of 16 and 32 channels with batch norm, dropout before the
    classifier) trained with Adam on a one-cycle schedule on one CPU thread; its softmax on the
    held-out rows. With ``flip`` (for data whose labels survive a mirror image: clothes, natural
    images; not digits or text), training sees random horizontal flips and the prediction
    averages the image and its mirror."""
    import torch
    from torch import nn

    torch.set_num_threads(1)  # deterministic, and one Ray CPU slot per fold
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c, h, w = x.shape[1:]
    net = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), 128), nn.ReLU(),
                        nn.Dropout(0.3), nn.Linear(128, num_classes))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x[train_idx]), torch.from_numpy(y[train_idx])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=max(1, epochs * math.ceil(len(xt) / batch)))
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for s in range(0, len(xt), batch):
            b = perm[s:s + batch]
            xb = xt[b]
            if flip:
                mirror = torch.rand(len(b), generator=gen) < 0.5
                xb = torch.where(mirror[:, None, None, None], xb.flip(-1), xb)
            opt.zero_grad()
            nn.functional.cross_entropy(net(xb), yt[b]).backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        xs = torch.from_numpy(x[test_idx])
        out = []
        for s in range(0, len(xs), 1024):
            p = torch.softmax(net(xs[s:s + 1024]), dim=1)
            if flip:
                p = (p + torch.softmax(net(xs[s:s + 1024].flip(-1)), dim=1)) / 2
            out.append(p)
    return (torch.cat(out).numpy() if out else np.zeros((0, num_classes))).astype(np.float64)


def out_of_fold_proba(x: np.ndarray, y: np.ndarray, num_classes: int, folds: int, model: str,
                      seed: int, cnn_epochs: int = CNN_EPOCHS, flip: bool = False) -> np.ndarray:
    """Out-of-fold predicted probabilities [n, num_classes], one Ray task per fold."""
    import ray
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(y, minlength=num_classes)
    present = counts[counts > 0]
    if present.min() >= folds:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    else:  # a class rarer than the fold count: plain folds
        splitter = KFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = list(splitter.split(x, y))
    remote = ray.remote(num_cpus=1)(_fit_fold)
    x_ref, y_ref = ray.put(x), ray.put(y)
    futures = [remote.remote(x_ref, y_ref, tr, te, num_classes, model, seed + i, cnn_epochs, flip)
               for i, (tr, te) in enumerate(splits)]
    proba = np.zeros((len(y), num_classes), dtype=np.float64)
    for (_, te), part in zip(splits, ray.get(futures), strict=True):
        proba[te] = part
    return proba


def _features(x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """Centered features, PCA-reduced to PCA_DIMS when wider (seeded randomized PCA)."""
    if x.shape[1] <= PCA_DIMS:
        return x - x.mean(axis=0), f"{x.shape[1]} pixels"
    from sklearn.decomposition import PCA

    dims = min(PCA_DIMS, len(x))
    pca = PCA(n_components=dims, svd_solver="randomized", random_state=seed)
    return pca.fit_transform(x).astype(np.float32), f"PCA {dims} of {x.shape[1]} pixels"


def find_label_errors(x: np.ndarray, y: np.ndarray, num_classes: int, folds: int,
                      model: str | list[str], seed: int, shape: tuple = (),
                      cnn_epochs: int = CNN_EPOCHS,
                      flip: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(ranked indices of suspected label errors, out-of-fold probabilities, facts).

    ``model`` may name several quick models: their out-of-fold probabilities (same folds) are
    averaged, an ensemble whose members err on different rows, so fewer clean but ambiguous
    rows look mislabeled."""
    from cleanlab.filter import find_label_issues

    members = [model] if isinstance(model, str) else list(model)
    probas, described, member_acc = [], [], {}
    flat = None
    for name in members:
        if name == "cnn":  # the pixels as images [n, C, H, W]
            img = tuple(shape) if len(shape) == 3 else (1, *shape)
            feats, what = x.reshape(len(x), *img), f"{'x'.join(map(str, img))} pixels"
        else:
            flat = flat if flat is not None else _features(x, seed)
            feats, what = flat
        started = time.perf_counter()
        probas.append(out_of_fold_proba(feats, y, num_classes, folds, name, seed, cnn_epochs, flip))
        member_acc[name] = {"oof_accuracy": round(float((probas[-1].argmax(1) == y).mean()), 4),
                            "seconds": round(time.perf_counter() - started, 1)}
        described.append(f"{name}: {what}" if len(members) > 1 else what)
    proba = np.mean(probas, axis=0)
    described = "; ".join(described)
    # cleanlab needs every class 0..num_classes-1 present in the given labels: score only
    # against the classes that occur (a class id with no rows has nothing to mislabel)
    present = np.flatnonzero(np.bincount(y, minlength=num_classes))
    remap = np.full(num_classes, -1)
    remap[present] = np.arange(len(present))
    sub = proba[:, present]
    sub = sub / np.clip(sub.sum(axis=1, keepdims=True), 1e-12, None)
    issues = find_label_issues(labels=remap[y], pred_probs=sub, filter_by=FILTER_BY,
                               return_indices_ranked_by="self_confidence", n_jobs=1)
    facts = {"features": described, "oof_accuracy": round(float((proba.argmax(1) == y).mean()), 4)}
    if len(members) > 1:
        facts["members"] = member_acc
    return np.asarray(issues, dtype=np.int64), proba, facts


def _tagger(key: str, label: str, num_classes: int, flagged: dict[Any, tuple[int, str]]):
    """A pyarrow batch function appending ``step`` and ``reason`` to every row."""
    import pyarrow as pa

    def tag(batch: pa.Table) -> pa.Table:
        reasons = []
        for k, value in zip(batch[key].to_pylist(), batch[label].to_pylist(), strict=True):
            reason = label_problem(value, num_classes)
            if not reason and k in flagged:
                given, why = flagged[k]
                if int(value) == given:
                    reason = why
            reasons.append(reason)
        return (batch.append_column("step", pa.array([STEP_NAME] * batch.num_rows, pa.string()))
                .append_column("reason", pa.array(reasons, pa.string())))

    return tag


def _keep_where(empty: bool):
    import pyarrow.compute as pc

    def keep(batch):
        mask = pc.equal(batch["reason"], "")
        return batch.filter(mask if empty else pc.invert(mask))

    return keep


def label_errors(ds: ray.data.Dataset, step: Any, ctx: StepContext) -> StepOutput:
    """The ``labels`` step: see the module docstring."""
    start = time.perf_counter()
    if ctx.modality != "image" or not ctx.label:
        raise ValueError(f"{_step_where(step)}: 'labels' needs a classifier source (rows with a "
                         f"labels column); this source is {ctx.modality!r} without labels")
    action = getattr(step, "action", "flag")
    folds = int(getattr(step, "folds", 5))
    model = getattr(step, "model", "logistic")
    cnn_epochs = int(getattr(step, "cnn_epochs", CNN_EPOCHS))
    flip = bool(getattr(step, "flip", False))
    if action not in ("flag", "drop"):
        raise ValueError(f"{_step_where(step, 'action')}: {action!r}, expected 'flag' or 'drop'")
    for name in [model] if isinstance(model, str) else (model or [None]):
        if name not in MODELS:
            raise ValueError(f"{_step_where(step, 'model')}: {name!r}, expected one of {MODELS} "
                             "or a list of them")
    if folds < 2:
        raise ValueError(f"{_step_where(step, 'folds')}: {folds}, needs at least 2")

    keys, labels, x, shape = _collect(ds, ctx.key, ctx.content, ctx.label)
    num_classes = getattr(step, "num_classes", None)
    if num_classes is None:  # from the data: the largest valid label + 1
        valid = [int(v) for v in labels if not label_problem(v, None)]
        num_classes = max(valid) + 1 if valid else 0
    num_classes = int(num_classes)
    bad = [label_problem(v, num_classes) for v in labels]
    good = np.array([not b for b in bad], dtype=bool)
    if len(good):  # rows with non-finite pixels cannot be scored: kept, not flagged
        good &= np.isfinite(x).all(axis=1)
    details: dict[str, Any] = {
        "rows": len(keys), "num_classes": num_classes, "action": action, "model": model,
        "folds": folds, "bad_labels": sum(1 for b in bad if b),
        "bad_label_examples": [{"key": k, "reason": b} for k, b in zip(keys, bad, strict=True)
                               if b][:MAX_EXAMPLES],
    }
    # a fixed row order for the folds whatever the block order: by key, then label
    idx = np.flatnonzero(good)
    order = sorted(idx.tolist(), key=lambda i: (str(keys[i]), int(labels[i])))
    idx = np.asarray(order, dtype=np.int64)
    y = np.asarray([int(labels[i]) for i in idx], dtype=np.int64)
    classes = len(np.unique(y)) if len(y) else 0
    flagged: dict[Any, tuple[int, str]] = {}
    if len(y) < 2 * folds or classes < 2:
        details.update(scored=0, flagged=0, skipped=f"{len(y)} usable rows in {classes} "
                       f"classes: too few to cross-validate with {folds} folds")
    else:
        issues, proba, facts = find_label_errors(x[idx], y, num_classes, folds, model,
                                                 int(ctx.seed), shape, cnn_epochs, flip)
        examples = []
        for j in issues.tolist():
            given, pred = int(y[j]), int(proba[j].argmax())
            p = float(proba[j, pred])
            row_key = keys[idx[j]]
            flagged[row_key] = (given, f"label_error: given {given}, predicted {pred} (p={p:.2f})")
            if len(examples) < MAX_EXAMPLES:
                examples.append({"key": row_key, "given": given, "predicted": pred,
                                 "p": round(p, 4)})
        details.update(scored=len(y), flagged=len(issues),
                       flagged_fraction=round(len(issues) / len(y), 4), examples=examples, **facts)
        if action == "flag":
            listed = [keys[idx[j]] for j in issues.tolist()]
            details["flagged_keys"] = listed[:MAX_FLAGGED_KEYS]
            if len(listed) > MAX_FLAGGED_KEYS:
                details["flagged_keys_truncated"] = True
    details["seconds"] = round(time.perf_counter() - start, 2)

    rejects = flagged if action == "drop" else {}
    tagged = ds.map_batches(_tagger(ctx.key, ctx.label, num_classes, rejects),
                            batch_format="pyarrow")
    kept = tagged.map_batches(_keep_where(True), batch_format="pyarrow") \
        .drop_columns(["step", "reason"])
    rejected = tagged.map_batches(_keep_where(False), batch_format="pyarrow")
    return StepOutput(kept=kept, rejected=rejected, details=details)
