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

Scale: nothing proportional to the row count is in the driver or in a task's pickled
arguments (issue 17, item 3). The driver materializes the rows once and holds their block
refs (one ``ObjectRef`` per block, ``to_arrow_refs``); label checks, class counts and the
bad-label examples are per-batch partial results of a Ray Data ``map_batches`` summed there
(one small row per batch). A row's fold is a seeded hash of its key (``fold_of``). One Ray task
fits the PCA on a seeded sample of at most ``PCA_SAMPLE`` rows (bottom-k by a seeded key hash:
every row of Fashion-MNIST's 60,000) and returns the projection as an object ref; then one Ray
task per fold (``num_cpus=1``) reads the blocks, keeps its usable rows (sorted by key, so the
block order does not matter), projects them, trains every member model for that fold and
returns a small Arrow table (key, given label, averaged probabilities) of its test rows plus
per-member counts. One more Ray task concatenates those tables, runs cleanlab on the
``n x num_classes`` probabilities and returns the flagged rows as a table in the object store;
the driver receives only counts, ``MAX_EXAMPLES`` examples and the first ``MAX_FLAGGED_KEYS``
flagged keys. ``action: drop`` tags rows in Ray Data tasks that fetch the flagged table by
its ref (a ``fn_kwargs`` argument: an ``ObjectRef``, not the rows). Limits: each fold task
holds every usable row's features (60,000 x 784 float32 = 188 MB for Fashion-MNIST) and
the scoring task ``n x num_classes`` probabilities, so data far larger than one worker's
memory would need an incremental model instead (not done here).

Deterministic for a fixed ``ctx.seed``, whatever the block split or order: folds and the PCA
sample come from seeded hashes of the keys, each task orders its rows by key (then label),
PCA, folds and models are all seeded, and Ray workers run single-threaded BLAS.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from bigopt.data.steps import StepContext, StepOutput, pickled_bytes

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

STEP_NAME = "labels"
#: images wider than this many pixels are PCA-reduced to it before fitting
PCA_DIMS = 100
#: the PCA is fitted on at most this many rows (a seeded sample by key hash; all rows below)
PCA_SAMPLE = 65_536
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


def _key_hash(keys: list[Any], seed: int, salt: str) -> np.ndarray:
    """A seeded 63-bit hash of each key (its ``str``): the same value in every task."""
    prefix = f"{salt}:{seed}:".encode()
    return np.array([int.from_bytes(hashlib.blake2b(prefix + str(k).encode(), digest_size=8)
                                    .digest(), "little") >> 1 for k in keys], dtype=np.int64)


def fold_of(keys: list[Any], seed: int, folds: int) -> np.ndarray:
    """Each row's fold (0..folds-1): a seeded hash of its key, so a row's fold depends on
    neither the block split nor the order of the rows (folds are not stratified)."""
    return _key_hash(keys, seed, "fold") % folds


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
    parts = [p for p in parts if len(p)]
    out = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    assert len(out) == n, (len(out), n)
    return out, shape


def _label_values(col: pa.ChunkedArray, num_classes: int | None) -> tuple[np.ndarray, list[str]]:
    """(int64 labels, -1 where unusable; each row's ``bad_label`` reason, '' when usable)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(col)
    if pa.types.is_integer(col.type):  # the common case, vectorised; reasons for bad rows only
        col = col.cast(pa.int64())
        y = pc.fill_null(col, -1).to_numpy().astype(np.int64) if n else np.zeros(0, np.int64)
        ok = ~np.asarray(pc.is_null(col)) & (y >= 0) if n else np.zeros(0, bool)
        if num_classes is not None:
            ok &= y < num_classes
        reasons = [""] * n
        values = col.to_pylist() if not ok.all() else None
        for i in np.flatnonzero(~ok):
            reasons[i] = label_problem(values[i], num_classes)
        return np.where(ok, y, -1), reasons
    values = col.to_pylist()
    reasons = [label_problem(v, num_classes) for v in values]
    y = np.array([-1 if r else int(v) for v, r in zip(values, reasons, strict=True)], np.int64)
    return y, reasons


def _usable(table: pa.Table, key: str, label: str, content: str, num_classes: int | None):
    """(keys, labels, [n, features] pixels, one row's shape, reasons, mask) of one block or
    batch: ``mask`` marks the rows with a usable label and finite pixels, the rows scored."""
    y, reasons = _label_values(table[label], num_classes)
    x, shape = _content_matrix(table[content], table.num_rows, content)
    mask = y >= 0
    if len(x) and x.shape[1]:  # rows with non-finite pixels cannot be scored: kept, not flagged
        mask &= np.isfinite(x).all(axis=1)
    return table[key], y, x, shape, reasons, mask


def _label_stats(batch: pa.Table, key: str, label: str, content: str,
                 num_classes: int | None) -> pa.Table:
    """Ray Data task: one row of partial counts for this batch (summed in the driver): rows,
    bad labels, the largest valid label, usable rows per class, pixels per row, the shape,
    and the first ``MAX_EXAMPLES`` bad labels by key."""
    import pyarrow as pa

    keys, y, x, shape, reasons, mask = _usable(batch, key, label, content, num_classes)
    bad = [(str(k), k, r) for k, r in zip(keys.to_pylist(), reasons, strict=True) if r] \
        if any(reasons) else []
    examples = [{"key": k, "reason": r} for _, k, r in sorted(bad, key=lambda b: b[0])][:MAX_EXAMPLES]
    counts = np.bincount(y[mask], minlength=0) if mask.any() else np.zeros(0, np.int64)
    return pa.table({"rows": [batch.num_rows], "bad": [len(bad)],
                     "max_label": [int(y.max()) if len(y) else -1],
                     "counts": pa.array([counts.tolist()], pa.list_(pa.int64())),
                     "width": [int(x.shape[1]) if batch.num_rows else -1],
                     "shape": ["x".join(map(str, shape))],
                     "examples": pa.array([pickle.dumps(examples)], pa.binary())})


def _summary(ds: ray.data.Dataset, key: str, label: str, content: str,
             num_classes: int | None) -> dict[str, Any]:
    """The per-batch partial counts of :func:`_label_stats`, summed (the driver's only pass
    over the rows: one small row per batch comes back)."""
    total: dict[str, Any] = {"rows": 0, "bad": 0, "max_label": -1, "counts": np.zeros(0, np.int64),
                             "widths": set(), "shape": (), "examples": []}
    parts = ds.map_batches(_label_stats, batch_format="pyarrow", batch_size=None, fn_kwargs={
        "key": key, "label": label, "content": content, "num_classes": num_classes})
    for part in parts.iter_rows():
        total["rows"] += part["rows"]
        total["bad"] += part["bad"]
        total["max_label"] = max(total["max_label"], part["max_label"])
        counts = np.asarray(part["counts"], np.int64)
        size = max(len(counts), len(total["counts"]))
        total["counts"] = (np.pad(total["counts"], (0, size - len(total["counts"])))
                           + np.pad(counts, (0, size - len(counts))))
        if part["width"] >= 0:
            total["widths"].add(part["width"])
            total["shape"] = total["shape"] or tuple(int(s) for s in part["shape"].split("x") if s)
        total["examples"] = sorted([*total["examples"], *pickle.loads(part["examples"])],
                                   key=lambda e: str(e["key"]))[:MAX_EXAMPLES]
    if len(total["widths"]) > 1:
        raise ValueError(f"the labels step needs images of one shape; column {content!r} holds "
                         f"{sorted(total['widths'])} pixels per row")
    return total


def _gather(blocks: list[Any], key: str, label: str, content: str, num_classes: int):
    """In a Ray task: (keys as an Arrow array, labels, [n, features] pixels) of the usable
    rows of every block, ordered by key then label (the same whatever the block order)."""
    import pyarrow as pa
    import ray

    keys, ys, xs = [], [], []
    for ref in blocks:  # one block at a time: only the usable rows' copies are kept
        table = ray.get(ref)
        k, y, x, _, _, mask = _usable(table.select([key, label, content]), key, label, content,
                                      num_classes)
        keys.append(k.filter(pa.array(mask)))
        ys.append(y[mask])
        xs.append(x[mask])
        del table
    karr = pa.chunked_array([c for k in keys for c in k.chunks], type=keys[0].type).combine_chunks() \
        if keys else pa.array([])
    y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    width = max((x.shape[1] for x in xs if len(x)), default=0)
    x = np.concatenate([x for x in xs if len(x)]) if any(len(x) for x in xs) \
        else np.zeros((0, width), np.float32)
    order = np.lexsort((y, np.array([str(v) for v in karr.to_pylist()], dtype=str)))
    return karr.take(pa.array(order)), y[order], x[order]


def _pca_fit(blocks: list[Any], key: str, label: str, content: str, num_classes: int, seed: int,
             limit: int = PCA_SAMPLE) -> tuple[dict[str, np.ndarray], str]:
    """Ray task: ({mean, components or None}, description) fitted on at most ``limit`` usable
    rows: those with the smallest seeded key hashes (a running bottom-k, block by block: bounded
    memory, and the same sample whatever the block order), in hash order."""
    import ray

    hashes: list[np.ndarray] = []
    names: list[np.ndarray] = []
    xs: list[np.ndarray] = []
    held, seen, threshold, width = 0, 0, None, 0

    def compact() -> None:
        nonlocal threshold, held
        h, s = np.concatenate(hashes), np.concatenate(names)
        keep = np.lexsort((s, h))[:limit]
        x = np.concatenate(xs)[keep]
        hashes[:], names[:], xs[:] = [h[keep]], [s[keep]], [x]
        held = len(keep)
        threshold = int(h[keep][-1]) if held == limit else None

    for ref in blocks:
        table = ray.get(ref)
        k, _, x, _, _, mask = _usable(table.select([key, label, content]), key, label, content,
                                      num_classes)
        width = width or (x.shape[1] if len(x) else 0)
        keys = [v for v, m in zip(k.to_pylist(), mask, strict=True) if m]
        h = _key_hash(keys, seed, "pca")
        sel = np.ones(len(h), bool) if threshold is None else h <= threshold
        seen += len(h)
        if sel.any():
            hashes.append(h[sel])
            names.append(np.array([str(v) for v, m in zip(keys, sel, strict=True) if m], dtype=str))
            xs.append(x[mask][sel])
            held += int(sel.sum())
        del table
        if held > limit + limit // 4:  # at most 1.25 x limit rows held
            compact()
    if xs:
        compact()
    x = xs[0] if xs else np.zeros((0, width), np.float32)
    d = x.shape[1]
    if d <= PCA_DIMS:
        mean = x.mean(axis=0) if len(x) else np.zeros(d, np.float32)
        return {"mean": mean.astype(np.float32), "components": None}, f"{d} pixels"
    from sklearn.decomposition import PCA

    dims = min(PCA_DIMS, len(x))
    pca = PCA(n_components=dims, svd_solver="randomized", random_state=seed).fit(x)
    what = f"PCA {dims} of {d} pixels"
    if seen > len(x):
        what += f" (fitted on {len(x):,} of {seen:,} rows)"
    return {"mean": pca.mean_.astype(np.float32),
            "components": pca.components_.astype(np.float32)}, what


def _project(x: np.ndarray, pca: dict[str, np.ndarray]) -> np.ndarray:
    """Centered features, PCA-projected when the fit reduced them."""
    centered = x - pca["mean"]
    if pca["components"] is None:
        return centered
    return (centered @ pca["components"].T).astype(np.float32)


def _fit_fold(x, y, train_idx, test_idx, num_classes: int, model: str, seed: int,
              cnn_epochs: int = CNN_EPOCHS, flip: bool = False) -> np.ndarray:
    """Out-of-fold class probabilities [len(test_idx), num_classes] of one fold."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    trained = np.unique(y[train_idx])
    if len(trained) < 2 and model != "cnn":  # a fold whose training rows hold one class or none
        proba = np.full((len(test_idx), num_classes), 1.0 / num_classes)
        if len(trained):
            proba[:] = 0.0
            proba[:, trained[0]] = 1.0
        return proba
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


def _fold_task(fold: int, blocks: list[Any], key: str, label: str, content: str,
               num_classes: int, folds: int, members: list[str], seed: int, image: tuple,
               cnn_epochs: int, flip: bool, pca: dict[str, np.ndarray] | None):
    """Ray task, one per fold: (Arrow table {key, given, proba} of this fold's test rows, the
    mean of the members' out-of-fold probabilities; {member: correct, seconds})."""
    import pyarrow as pa

    keys, y, x = _gather(blocks, key, label, content, num_classes)
    in_fold = fold_of(keys.to_pylist(), seed, folds) == fold
    train, test = np.flatnonzero(~in_fold), np.flatnonzero(in_fold)
    probas, facts, flat = [], {}, None
    for name in members:
        started = time.perf_counter()
        if name == "cnn":  # the pixels as images [n, C, H, W]
            feats = x.reshape(len(x), *image)
        else:
            flat = flat if flat is not None else _project(x, pca)
            feats = flat
        proba = _fit_fold(feats, y, train, test, num_classes, name, seed + fold, cnn_epochs, flip)
        probas.append(proba)
        facts[name] = {"correct": int((proba.argmax(1) == y[test]).sum()) if len(test) else 0,
                       "seconds": time.perf_counter() - started}
    proba = np.mean(probas, axis=0) if len(test) else np.zeros((0, num_classes))
    table = pa.table({"key": keys.take(pa.array(test, pa.int64())),
                      "given": pa.array(y[test], pa.int64()),
                      "proba": pa.FixedSizeListArray.from_arrays(
                          pa.array(proba.astype(np.float64).ravel()), num_classes)})
    return table, {"rows": len(test), "members": facts}


def _score_task(num_classes: int, list_keys: bool, *tables: pa.Table):
    """Ray task: cleanlab's ``find_label_issues`` over the folds' out-of-fold probabilities.
    Returns (Arrow table of the flagged rows ranked, lowest self-confidence first: {key,
    given, predicted, p, reason}; a small summary: counts, out-of-fold accuracy, the first
    ``MAX_EXAMPLES`` rows, the first ``MAX_FLAGGED_KEYS`` keys when ``list_keys``)."""
    import pyarrow as pa
    from cleanlab.filter import find_label_issues

    from bigopt.data.engine import concat

    table = concat(list(tables))
    names = np.array([str(v) for v in table["key"].to_pylist()], dtype=str)
    y = table["given"].to_numpy()
    order = np.lexsort((y, names))  # one row order whatever the folds' (ties: stable)
    table, y = table.take(pa.array(order)), y[order]
    proba = (table["proba"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
             .reshape(len(y), num_classes))
    # cleanlab needs every class 0..num_classes-1 present in the given labels: score only
    # against the classes that occur (a class id with no rows has nothing to mislabel)
    present = np.flatnonzero(np.bincount(y, minlength=num_classes))
    remap = np.full(num_classes, -1)
    remap[present] = np.arange(len(present))
    sub = proba[:, present]
    sub = sub / np.clip(sub.sum(axis=1, keepdims=True), 1e-12, None)
    issues = np.asarray(find_label_issues(labels=remap[y], pred_probs=sub, filter_by=FILTER_BY,
                                          return_indices_ranked_by="self_confidence", n_jobs=1),
                        dtype=np.int64)
    given, pred = y[issues], proba[issues].argmax(1) if len(issues) else np.zeros(0, np.int64)
    p = proba[issues, pred]
    flagged = pa.table({
        "key": table["key"].take(pa.array(issues, pa.int64())),
        "given": pa.array(given, pa.int64()), "predicted": pa.array(pred, pa.int64()),
        "p": pa.array(p, pa.float64()),
        "reason": pa.array([f"label_error: given {g}, predicted {q} (p={v:.2f})"
                            for g, q, v in zip(given.tolist(), pred.tolist(), p.tolist(),
                                               strict=True)], pa.string())})
    head = flagged.slice(0, MAX_EXAMPLES).to_pylist()
    summary: dict[str, Any] = {
        "scored": len(y), "flagged": len(issues),
        "flagged_fraction": round(len(issues) / len(y), 4) if len(y) else 0.0,
        "examples": [{"key": r["key"], "given": r["given"], "predicted": r["predicted"],
                      "p": round(r["p"], 4)} for r in head],
        "oof_accuracy": round(float((proba.argmax(1) == y).mean()), 4) if len(y) else 0.0}
    if list_keys:
        summary["flagged_keys"] = flagged["key"].slice(0, MAX_FLAGGED_KEYS).to_pylist()
        if len(issues) > MAX_FLAGGED_KEYS:
            summary["flagged_keys_truncated"] = True
    return flagged, summary


def _tag(batch: pa.Table, key: str, label: str, num_classes: int, flagged: Any) -> pa.Table:
    """Ray Data task: ``step`` and ``reason`` appended to every row: its ``bad_label`` reason,
    else its ``label_error`` reason when ``flagged`` (an ``ObjectRef`` of the scoring task's
    table, fetched here, never pickled with the function) holds its key and given label."""
    import pyarrow as pa
    import pyarrow.compute as pc

    _, reasons = _label_values(batch[label], num_classes)
    if flagged is not None and batch.num_rows:
        import ray

        table = ray.get(flagged)
        hit = np.asarray(pc.is_in(batch[key], value_set=table["key"].combine_chunks()))
        if hit.any():
            rows = np.flatnonzero(hit)
            mine = table.filter(pc.is_in(table["key"], value_set=batch[key].take(pa.array(rows))))
            why = {(str(k), g): r for k, g, r in zip(mine["key"].to_pylist(),
                                                    mine["given"].to_pylist(),
                                                    mine["reason"].to_pylist(), strict=True)}
            keys, labels = batch[key].to_pylist(), batch[label].to_pylist()
            for i in rows.tolist():
                if not reasons[i]:  # usable label: the flagged row if its label is the given one
                    reasons[i] = why.get((str(keys[i]), int(labels[i])), "")
    return (batch.append_column("step", pa.array([STEP_NAME] * batch.num_rows, pa.string()))
            .append_column("reason", pa.array(reasons, pa.string())))


def _keep_where(batch: pa.Table, empty: bool) -> pa.Table:
    import pyarrow.compute as pc

    mask = pc.equal(batch["reason"], "")
    return batch.filter(mask if empty else pc.invert(mask))


def _scores(ds: ray.data.Dataset, ctx: StepContext, num_classes: int, folds: int,
            members: list[str], shape: tuple, cnn_epochs: int, flip: bool,
            list_keys: bool) -> tuple[Any, dict[str, Any], int]:
    """The fold tasks and the scoring task on ``ds``'s blocks: (ref of the flagged table,
    the summary and facts for ``details``, the largest pickled task arguments)."""
    import ray

    blocks = ds.to_arrow_refs()  # one ObjectRef per block: what the tasks read the rows from
    seed = int(ctx.seed)
    cols = (ctx.key, ctx.label, ctx.content)
    image = tuple(shape) if len(shape) == 3 else (1, *shape)
    sent = 0
    pca, described = None, None
    if any(m != "cnn" for m in members):
        args = (blocks, *cols, num_classes, seed)
        sent = pickled_bytes(_pca_fit, *args)
        pca, described = ray.remote(num_cpus=1, num_returns=2)(_pca_fit).remote(*args)
    fold_fn = ray.remote(num_cpus=1, num_returns=2)(_fold_task)
    outputs = []
    for fold in range(folds):
        args = (fold, blocks, *cols, num_classes, folds, members, seed, image, cnn_epochs, flip)
        sent = max(sent, pickled_bytes(_fold_task, *args, pca))
        outputs.append(fold_fn.remote(*args, pca))
    tables = [t for t, _ in outputs]
    per_fold = ray.get([f for _, f in outputs])
    sent = max(sent, pickled_bytes(_score_task, num_classes, list_keys, *tables))
    flagged, summary_ref = ray.remote(num_cpus=1, num_returns=2)(_score_task).remote(
        num_classes, list_keys, *tables)
    summary = ray.get(summary_ref)
    described = ray.get(described) if described is not None else ""
    scored = sum(f["rows"] for f in per_fold)
    what = {"cnn": f"{'x'.join(map(str, image))} pixels"}
    summary["features"] = "; ".join(
        f"{m}: {what.get(m, described)}" if len(members) > 1 else what.get(m, described)
        for m in members)
    if len(members) > 1:  # per member: out-of-fold accuracy, task seconds summed over folds
        summary["members"] = {m: {
            "oof_accuracy": round(sum(f["members"][m]["correct"] for f in per_fold)
                                  / max(1, scored), 4),
            "seconds": round(sum(f["members"][m]["seconds"] for f in per_fold), 1)}
            for m in members}
    return flagged, summary, sent


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
    members = [model] if isinstance(model, str) else list(model)

    ds = ds.materialize()  # read once: the stats pass, the fold tasks and the tagging share it
    num_classes = getattr(step, "num_classes", None)
    stats = _summary(ds, ctx.key, ctx.label, ctx.content,
                     None if num_classes is None else int(num_classes))
    if num_classes is None:  # from the data: the largest valid label + 1
        num_classes = stats["max_label"] + 1
    num_classes = int(num_classes)
    counts = stats["counts"]
    usable, classes = int(counts.sum()), int((counts > 0).sum())
    details: dict[str, Any] = {
        "rows": stats["rows"], "num_classes": num_classes, "action": action, "model": model,
        "folds": folds, "bad_labels": stats["bad"], "bad_label_examples": stats["examples"],
    }
    flagged, sent = None, 0
    if usable < 2 * folds or classes < 2:
        details.update(scored=0, flagged=0, skipped=f"{usable} usable rows in {classes} "
                       f"classes: too few to cross-validate with {folds} folds")
    else:
        flagged, summary, sent = _scores(ds, ctx, num_classes, folds, members, stats["shape"],
                                         cnn_epochs, flip, action == "flag")
        details.update(summary)
    details["seconds"] = round(time.perf_counter() - start, 2)

    tag_args = {"key": ctx.key, "label": ctx.label, "num_classes": num_classes,
                "flagged": flagged if action == "drop" else None}
    sent = max(sent, pickled_bytes(_tag, tag_args))
    tagged = ds.map_batches(_tag, fn_kwargs=tag_args, batch_format="pyarrow").materialize()
    kept = tagged.map_batches(_keep_where, fn_kwargs={"empty": True}, batch_format="pyarrow") \
        .drop_columns(["step", "reason"])
    rejected = tagged.map_batches(_keep_where, fn_kwargs={"empty": False}, batch_format="pyarrow")
    return StepOutput(kept=kept, rejected=rejected, details=details, task_arg_bytes=sent)
