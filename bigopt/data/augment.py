"""Image augmentation with kornia: random crop (with padding), horizontal flip, rotation,
brightness/contrast jitter and Gaussian noise, seeded and reproducible.

Two places to apply it (``data.augment.when``): ``prepare`` writes ``copies`` augmented copies of
every training row into the train shards (ids ``<id>#aug<k>``, counted in the manifest), so the
cost is paid once; ``train`` augments each training batch as it is read, in Ray Data's batch
iterator inside each training worker (``iter_torch_batches(collate_fn=...)``), with a seed per
epoch and batch, so no two epochs see the same images and a rerun sees the same ones.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np


def pipeline(spec: Any, image_size: int) -> Any:
    import kornia.augmentation as K

    ops = []
    if spec.crop_padding:
        ops.append(K.RandomCrop((image_size, image_size), padding=spec.crop_padding))
    if spec.flip:
        ops.append(K.RandomHorizontalFlip())
    if spec.rotation:
        ops.append(K.RandomRotation(float(spec.rotation)))
    if spec.brightness or spec.contrast:
        ops.append(K.ColorJitter(brightness=spec.brightness, contrast=spec.contrast, p=1.0))
    if spec.noise_std:
        ops.append(K.RandomGaussianNoise(std=spec.noise_std, p=1.0))
    return K.AugmentationSequential(*ops)


def augment_images(x: Any, spec: Any, seed: int) -> Any:
    """``x`` [B, C, H, W] floats in [0, 1] (numpy or torch) -> augmented, same type, seeded."""
    import torch

    as_numpy = isinstance(x, np.ndarray)
    images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) if as_numpy else x.float()
    with torch.random.fork_rng(), torch.no_grad():  # kornia draws from torch's global RNG
        torch.manual_seed(seed)
        out = pipeline(spec, images.shape[-1])(images).clamp_(0, 1)
    return out.numpy() if as_numpy else out


def _batch_seed(seed: int, ids: Any) -> int:
    import hashlib

    first = str(ids[0]) if len(ids) else ""
    digest = hashlib.blake2b(f"{seed}:{first}:{len(ids)}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def augmented_copies(batch: dict[str, np.ndarray], spec: Any) -> dict[str, np.ndarray]:
    """Prepare time: ``spec.copies`` augmented copies of each row, ids ``<id>#aug<k>``. The seed
    comes from the batch's rows, so the same shards give the same copies."""
    x = np.stack(batch["inputs"]).astype(np.float32)
    out: dict[str, list[Any]] = {k: [] for k in batch}
    for k in range(1, spec.copies + 1):
        images = augment_images(x, spec, _batch_seed(spec.seed + k, batch["id"]))
        for name, values in batch.items():
            if name == "inputs":
                out[name].extend(list(images))
            elif name == "id":
                out[name].extend(f"{i}#aug{k}" for i in values)
            else:
                out[name].extend(list(values))
    return {k: np.array(v) if k != "inputs" else np.stack(v) for k, v in out.items()}


_RNG_LOCK = threading.Lock()


class OnTheFly:
    """Train time: a collate function for ``iter_torch_batches`` that augments each batch.

    Ray Data may run collate functions in several threads and in any order, so the seed comes
    from the batch's own content (and the spec seed and epoch), not from a counter, and one lock
    serialises the use of torch's global RNG, which kornia draws from. Known limit: a model with
    dropout draws from the same global RNG in the training thread, so its masks are then not
    reproducible run to run (bigopt's CNN and default MLP have no dropout)."""

    def __init__(self, spec: Any, x_col: str, epoch_seed: int):
        self.spec, self.x_col, self.epoch_seed = spec, x_col, epoch_seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import hashlib

        import torch

        out = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()
               if k != self.x_col and np.asarray(v).dtype != object}
        x = np.ascontiguousarray(np.stack(batch[self.x_col]), dtype=np.float32)
        digest = hashlib.blake2b(x.tobytes(), digest_size=4,
                                 key=f"{self.spec.seed}:{self.epoch_seed}".encode()).digest()
        with _RNG_LOCK:
            out[self.x_col] = torch.from_numpy(
                augment_images(x, self.spec, int.from_bytes(digest, "big") % 2**31))
        return out
