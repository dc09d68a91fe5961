"""The ``labels`` cleaning step on Fashion-MNIST with labels flipped on purpose.

5 % of the 60,000 training labels (``--noise``) are flipped, seeded, each to a different class
drawn uniformly; the rows go through a Ray Dataset (one Arrow table of ``{id, inputs [1, 28,
28] float32 in [0, 1], labels}``, as the data stage builds them) into
``bigopt.data.labels.label_errors`` with ``action: flag``, and the flagged keys are scored
against the flipped ones: recall (flipped rows found), precision (flagged rows that were
flipped), rows flagged, out-of-fold accuracy of the quick model against the noisy labels, and
wall time of the step.

    python benchmarks/label_errors.py --model logistic mlp --seeds 0 1 2
    python benchmarks/label_errors.py --model cnn+mlp --flip --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read at `import ray`: loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

from bigopt.data.idx import FASHION_MNIST_DIR, read_part  # noqa: E402
from bigopt.data.labels import label_errors  # noqa: E402
from bigopt.data.steps import StepContext  # noqa: E402


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int):
    """(noisy copy of ``labels``, indices flipped): each flipped label moves to another class."""
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(len(labels), int(round(fraction * len(labels))), replace=False))
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, len(flipped))) % num_classes
    return noisy, flipped


def dataset(images: np.ndarray, labels: np.ndarray):
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    ids = [f"fmnist-train-{i:05d}" for i in range(1, len(labels) + 1)]
    table = pa.table({"id": pa.array(ids, pa.string()),
                      "inputs": ArrowTensorArray.from_numpy((images.astype(np.float32) / 255.0)
                                                            [:, None, :, :]),
                      "labels": pa.array(labels.astype(np.int64))})
    # several blocks, as a read would give: the step's tasks read the rows block by block
    return ray.data.from_arrow([table.slice(o, 10_000) for o in range(0, len(ids), 10_000)]), ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=FASHION_MNIST_DIR)
    ap.add_argument("--rows", type=int, default=None, help="first N training rows (default all)")
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--model", nargs="+", default=["logistic", "mlp"],
                    help="logistic, mlp, cnn, or an ensemble joined by '+' (cnn+mlp)")
    ap.add_argument("--cnn-epochs", type=int, default=4)
    ap.add_argument("--flip", action="store_true", help="the step's flip option (cnn)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--cpus", type=int, default=2, help="Ray CPU slots (one fold per slot)")
    args = ap.parse_args(argv)

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    part = read_part(args.root, "train", args.rows)
    print(f"Fashion-MNIST train: {len(part.labels)} rows, {args.noise:.0%} labels flipped, "
          f"{args.folds} folds, {args.cpus} Ray CPU slots", flush=True)
    header = (f"| {'model':8} | seed | flipped | flagged | recall | precision | oof acc | "
              f"features | time (s) |")
    lines = [header, "|" + "|".join("---" for _ in header.split("|")[1:-1]) + "|"]
    print("\n".join(lines), flush=True)
    notes: list[str] = []
    for model in args.model:
        for seed in args.seeds:
            noisy, flipped = flip_labels(part.labels.astype(np.int64), args.noise, 10, seed)
            ds, ids = dataset(part.images, noisy)
            truth = {ids[i] for i in flipped}
            members = model.split("+")
            step = SimpleNamespace(kind="labels", action="flag", folds=args.folds, num_classes=10,
                                   model=members[0] if len(members) == 1 else members,
                                   cnn_epochs=args.cnn_epochs, flip=args.flip)
            ctx = StepContext(key="id", content="inputs", label="labels", modality="image",
                              seed=seed)
            start = time.perf_counter()
            out = label_errors(ds, step, ctx)
            seconds = time.perf_counter() - start
            flagged = set(out.details.get("flagged_keys", []))
            hits = len(flagged & truth)
            recall, precision = hits / len(truth), hits / max(1, len(flagged))
            line = (f"| {model:8} ({args.cnn_epochs} ep{', flip' if args.flip else ''}) |"
                    if "cnn" in model else f"| {model:8} |")
            line += (f" {seed:4} | {len(truth):7} | {len(flagged):7} | {recall:6.1%} | "
                    f"{precision:9.1%} | {out.details.get('oof_accuracy', 0):7.2%} | "
                    f"{out.details.get('features', '')} | {seconds:8.1f} |")
            lines.append(line)
            print(line, flush=True)
            notes.append(f"{model} seed {seed}: members {out.details.get('members')}; "
                         f"largest pickled task argument {out.task_arg_bytes} bytes")
    print("\n".join(notes), flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
