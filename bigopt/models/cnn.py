"""Small image classifier mixing ResNet basic blocks (with or without skip), DenseNet dense
blocks and transformer (attention) blocks.

The block list is plain data (``[{"type": "resnet", "channels": 64, "stride": 2}, ...]``) so an
architecture search can mutate it and store it per trial. Layers: the stem conv, one layer per
block dict, then the head (global average pool + flatten + linear); each takes and returns one
tensor, so DeepSpeed's PipelineModule can cut between any two.
"""

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bigopt.models.base import Device, LayeredModel, RngSnapshot, require_positive_int

#: Default for 28x28 Fashion-MNIST: a residual block at full resolution, a dense block that
#: grows 32 -> 96 channels, a transition that compresses to 64 and halves to 14x14, then a
#: strided residual block to 128 channels at 7x7. ~0.29M params and ~0.34 GFLOPs per training
#: sample: the size of the small ResNets usually quoted at 92-93% on Fashion-MNIST, while
#: staying cheap enough to train many trials during a search.
DEFAULT_BLOCKS: list[dict[str, Any]] = [
    {"type": "resnet", "channels": 32, "stride": 1},
    {"type": "dense", "growth": 16, "layers": 4},
    {"type": "transition", "channels": 64},
    {"type": "resnet", "channels": 128, "stride": 2},
]

# required keys per block type, and optional ones with their defaults; anything else is an error
BLOCK_KEYS: dict[str, tuple[str, ...]] = {
    "resnet": ("channels", "stride"),
    "plain": ("channels", "stride"),
    "dense": ("growth", "layers"),
    "transition": ("channels",),
    "transformer": ("channels", "heads"),
}
# Optional keys and their defaults; None means "derived": a residual block's internal ``width``
# (the first conv's output channels) defaults to its ``channels``. ``width`` exists so that a
# structurally pruned block (bigopt.compress.prune), whose two convs lose channels from
# different dependency groups, is expressible as an arch dict; it is left out when equal.
OPTIONAL_KEYS: dict[str, dict[str, int | None]] = {
    "resnet": {"kernel": 3, "width": None},
    "plain": {"kernel": 3, "width": None},
}


def _conv3x3(c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> nn.Conv2d:
    # no bias: every conv here is followed (or, in dense layers, preceded) by BatchNorm
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)


class ResidualBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    The shortcut is a strided 1x1 conv + BN when the channel count or resolution changes, and
    the identity otherwise.
    """

    def __init__(self, c_in: int, channels: int, stride: int, kernel: int = 3, skip: bool = True,
                 width: int | None = None) -> None:
        super().__init__()
        width = channels if width is None else width  # the inner conv's output channels
        self.body = nn.Sequential(
            _conv3x3(c_in, width, stride, kernel),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            _conv3x3(width, channels, 1, kernel),
            nn.BatchNorm2d(channels),
        )
        self.skip = skip
        self.shortcut: nn.Module = nn.Identity()
        if skip and (stride != 1 or c_in != channels):
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        # skip=False is the "plain" block: the same convs without the shortcut, so a search can
        # measure what the skip connection buys
        return self.act(self.body(x) + self.shortcut(x) if self.skip else self.body(x))


class AttentionBlock(nn.Module):
    """A pre-norm transformer block over the feature map's positions (ViT-style), for hybrid
    conv/attention models. Position comes from a depthwise 3x3 conv added to the input (a
    conditional positional encoding, Chu et al. 2021), so it works at any resolution. A 1x1
    conv projects to ``channels`` when the input width differs."""

    def __init__(self, c_in: int, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"transformer block: heads={heads} must divide channels={channels}")
        self.proj: nn.Module = (nn.Identity() if c_in == channels
                                else nn.Conv2d(c_in, channels, 1, bias=False))
        self.position = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(),
                                 nn.Linear(2 * channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        x = x + self.position(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        q = self.norm1(t)
        t = t + self.attn(q, q, q, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class DenseBlock(nn.Module):
    """DenseNet block: each layer is BN-ReLU-conv3x3 -> ``growth`` channels, concatenated.

    Output channels are ``c_in + layers * growth``; resolution is unchanged.
    """

    def __init__(self, c_in: int, growth: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(c_in + i * growth),
                nn.ReLU(inplace=False),  # its input is kept in the concatenation
                _conv3x3(c_in + i * growth, growth),
            )
            for i in range(layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


def _transition(c_in: int, channels: int) -> nn.Sequential:
    """DenseNet transition: BN-ReLU-conv1x1 to ``channels``, then 2x2 average pool."""
    return nn.Sequential(
        nn.BatchNorm2d(c_in),
        nn.ReLU(inplace=False),
        nn.Conv2d(c_in, channels, 1, bias=False),
        nn.AvgPool2d(2),
    )


def _validate_block(i: int, block: Any) -> dict[str, Any]:
    """Check one block dict; errors name ``blocks[i]`` and the offending key."""
    if not isinstance(block, Mapping):
        raise ValueError(f"blocks[{i}] must be a dict, got {type(block).__name__}")
    kind = block.get("type")
    if kind not in BLOCK_KEYS:
        raise ValueError(
            f"blocks[{i}]['type'] is {kind!r}; expected one of: {', '.join(BLOCK_KEYS)}"
        )
    expected = BLOCK_KEYS[kind]
    optional = OPTIONAL_KEYS.get(kind, {})
    for key in block:
        if key != "type" and key not in expected and key not in optional:
            raise ValueError(
                f"blocks[{i}] has unknown key {key!r} for type {kind!r}; "
                f"allowed keys are: type, {', '.join([*expected, *optional])}"
            )
    for key in expected:
        if key not in block:
            raise ValueError(f"blocks[{i}] (type {kind!r}) is missing key {key!r}")
    for key in (*expected, *(k for k in optional if k in block)):
        require_positive_int(f"blocks[{i}][{key!r}]", block[key])
    if kind in ("resnet", "plain") and block["stride"] not in (1, 2):
        raise ValueError(f"blocks[{i}]['stride'] must be 1 or 2, got {block['stride']!r}")
    if block.get("kernel", 3) % 2 == 0:
        raise ValueError(f"blocks[{i}]['kernel'] must be odd (same padding), got {block['kernel']!r}")
    if kind == "transformer" and block["channels"] % block["heads"]:
        raise ValueError(f"blocks[{i}]: heads={block['heads']} must divide "
                         f"channels={block['channels']}")
    return dict(block)


class CNN(LayeredModel):
    """Image classifier: stem conv, the configured blocks, global-average-pool head.

    Input is ``[B, in_channels, image_size, image_size]`` floats; output is logits
    ``[B, num_classes]``; the target for ``loss`` is class ids ``[B]``.
    """

    kind = "cnn"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        stem_channels: int = 32,
        blocks: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        for name, value in [
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("image_size", image_size),
            ("stem_channels", stem_channels),
        ]:
            require_positive_int(name, value)
        if blocks is None:
            blocks = DEFAULT_BLOCKS
        if isinstance(blocks, str | bytes) or not isinstance(blocks, Sequence):
            raise ValueError(f"blocks must be a list of dicts, got {type(blocks).__name__}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.stem_channels = stem_channels
        self.blocks_config = [_validate_block(i, b) for i, b in enumerate(blocks)]

        rng = RngSnapshot()  # before any layer draws its default init; see _finish_init

        self.stem = nn.Sequential(
            _conv3x3(in_channels, stem_channels), nn.BatchNorm2d(stem_channels), nn.ReLU()
        )
        channels, size = stem_channels, image_size
        body: list[nn.Module] = []
        for i, block in enumerate(self.blocks_config):
            if block["type"] in ("resnet", "plain"):
                body.append(ResidualBlock(channels, block["channels"], block["stride"],
                                          block.get("kernel", 3), skip=block["type"] == "resnet",
                                          width=block.get("width")))
                channels, size = block["channels"], (size - 1) // block["stride"] + 1
            elif block["type"] == "transformer":
                body.append(AttentionBlock(channels, block["channels"], block["heads"]))
                channels = block["channels"]
            elif block["type"] == "dense":
                body.append(DenseBlock(channels, block["growth"], block["layers"]))
                channels += block["growth"] * block["layers"]
            else:  # transition
                if size < 2:
                    raise ValueError(
                        f"blocks[{i}] (transition) would pool a {size}x{size} feature map to "
                        "nothing; remove a downsampling block or use a larger image_size"
                    )
                body.append(_transition(channels, block["channels"]))
                channels, size = block["channels"], size // 2
        self.body = nn.ModuleList(body)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
        )
        self._flops: float | None = None
        # Default PyTorch init only; _finish_init makes it exact under deepspeed.zero.Init too.
        self._finish_init(rng)

    def layers(self) -> list[nn.Module]:
        return [self.stem, *self.body, self.head]

    def flops_per_sample(self) -> float:
        """3 x forward FLOPs (backward ~ 2x forward) of all convs and linears, measured once."""
        if self._flops is None:
            self._flops = 3.0 * self._forward_flops_per_sample()
        return self._flops

    def example_input(self, batch_size: int, *, device: Device = None) -> tuple[Tensor, Tensor]:
        shape = (batch_size, self.in_channels, self.image_size, self.image_size)
        x = torch.randn(shape, device=device)
        return x, torch.randint(0, self.num_classes, (batch_size,), device=device)

    def arch(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "stem_channels": self.stem_channels,
            "blocks": copy.deepcopy(self.blocks_config),
        }
