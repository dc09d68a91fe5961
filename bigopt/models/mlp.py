"""Multilayer perceptron: the smallest model, for tabular data and fast end-to-end tests."""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bigopt.models.base import (
    Device,
    LayeredModel,
    RngSnapshot,
    require_dropout,
    require_positive_int,
)


class MLP(LayeredModel):
    """Flatten, then ``Linear+ReLU(+Dropout)`` per hidden width, then the output ``Linear``.

    The first layer flattens its input, so the model takes ``[B, in_features]`` or images whose
    ``C*H*W == in_features`` (e.g. 784 for 28x28 Fashion-MNIST). Flatten sits inside the first
    layer rather than being a layer of its own so a pipeline stage never holds only a reshape.
    Output is logits ``[B, num_classes]``; the target for ``loss`` is class ids ``[B]``.
    """

    kind = "mlp"

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (128, 128),
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        require_positive_int("in_features", in_features)
        require_positive_int("num_classes", num_classes)
        if isinstance(hidden, str | bytes) or not isinstance(hidden, Sequence):
            raise ValueError(f"hidden must be a list of ints, got {hidden!r}")
        for i, width in enumerate(hidden):
            require_positive_int(f"hidden[{i}]", width)
        self.in_features = in_features
        self.hidden = tuple(hidden)
        self.num_classes = num_classes
        self.dropout = require_dropout(dropout)

        rng = RngSnapshot()  # before any layer draws its default init; see _finish_init
        groups: list[list[nn.Module]] = []
        width_in = in_features
        for width in self.hidden:
            groups.append([nn.Linear(width_in, width), nn.ReLU()])
            if self.dropout > 0:
                groups[-1].append(nn.Dropout(self.dropout))
            width_in = width
        groups.append([nn.Linear(width_in, num_classes)])
        groups[0].insert(0, nn.Flatten())
        self.stack = nn.ModuleList(nn.Sequential(*g) for g in groups)
        self._flops: float | None = None
        # Default PyTorch init only; _finish_init makes it exact under deepspeed.zero.Init too.
        self._finish_init(rng)

    def layers(self) -> list[nn.Module]:
        return list(self.stack)

    def flops_per_sample(self) -> float:
        """3 x forward FLOPs (backward ~ 2x forward) of all linears, measured once."""
        if self._flops is None:
            self._flops = 3.0 * self._forward_flops_per_sample()
        return self._flops

    def example_input(self, batch_size: int, *, device: Device = None) -> tuple[Tensor, Tensor]:
        x = torch.randn(batch_size, self.in_features, device=device)
        return x, torch.randint(0, self.num_classes, (batch_size,), device=device)

    def arch(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_features": self.in_features,
            "hidden": list(self.hidden),
            "num_classes": self.num_classes,
            "dropout": self.dropout,
        }
