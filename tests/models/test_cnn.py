"""CNN: default architecture, block bookkeeping and block-list validation."""

import pytest
import torch

from bigopt.models import CNN
from bigopt.models.cnn import DEFAULT_BLOCKS, DenseBlock, ResidualBlock


def test_default_fits_fashion_mnist() -> None:
    model = CNN()
    x, _ = model.example_input(2)
    assert x.shape == (2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    assert model.arch()["blocks"] == DEFAULT_BLOCKS
    assert [b["type"] for b in DEFAULT_BLOCKS].count("dense") >= 1
    # one layer each for the stem and head, plus one per block
    assert len(model.layers()) == len(DEFAULT_BLOCKS) + 2


def test_arch_does_not_alias_the_default_blocks() -> None:
    model = CNN()
    model.arch()["blocks"][0]["channels"] = 999
    assert DEFAULT_BLOCKS[0]["channels"] == 32


def test_resnet_block_shapes_and_shortcut() -> None:
    same = ResidualBlock(8, 8, 1)
    assert isinstance(same.shortcut, torch.nn.Identity)
    down = ResidualBlock(8, 16, 2)
    assert down(torch.randn(2, 8, 9, 9)).shape == (2, 16, 5, 5)


def test_dense_block_concatenates_growth_channels() -> None:
    block = DenseBlock(c_in=6, growth=4, layers=3)
    x = torch.randn(2, 6, 7, 7)
    out = block(x)
    assert out.shape == (2, 6 + 3 * 4, 7, 7)
    torch.testing.assert_close(out[:, :6], x)  # the input is carried through unchanged


def test_rgb_and_other_image_sizes() -> None:
    model = CNN(
        in_channels=3,
        num_classes=7,
        image_size=32,
        stem_channels=8,
        blocks=[
            {"type": "dense", "growth": 4, "layers": 2},
            {"type": "transition", "channels": 8},
            {"type": "resnet", "channels": 16, "stride": 2},
            {"type": "resnet", "channels": 16, "stride": 2},
        ],
    )
    x, y = model.example_input(2)
    assert x.shape == (2, 3, 32, 32)
    assert model(x).shape == (2, 7)


def test_empty_block_list_is_stem_plus_head() -> None:
    model = CNN(blocks=[])
    assert len(model.layers()) == 2
    assert model(model.example_input(2)[0]).shape == (2, 10)


@pytest.mark.parametrize(
    ("blocks", "pattern"),
    [
        ([{"type": "resnet", "channels": 8, "stride": 1}, "dense"], r"blocks\[1\] must be a dict"),
        ([{"type": "inception", "channels": 8}], r"blocks\[0\]\['type'\].*inception.*resnet"),
        ([{"channels": 8}], r"blocks\[0\]\['type'\]"),
        ([{"type": "resnet", "channels": 8}], r"blocks\[0\].*missing key 'stride'"),
        ([{"type": "dense", "growth": 4, "layers": 2, "drop": 0.1}], r"blocks\[0\].*'drop'"),
        ([{"type": "resnet", "channels": 8, "stride": 3}], r"blocks\[0\]\['stride'\].*1 or 2"),
        ([{"type": "transition", "channels": 0}], r"blocks\[0\]\['channels'\]"),
        ([{"type": "dense", "growth": 4.0, "layers": 2}], r"blocks\[0\]\['growth'\]"),
    ],
)
def test_bad_blocks_raise_naming_index_and_key(blocks: list, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        CNN(blocks=blocks)


def test_too_much_downsampling_raises() -> None:
    blocks = [{"type": "transition", "channels": 4}] * 3
    with pytest.raises(ValueError, match=r"blocks\[2\].*1x1"):
        CNN(image_size=4, blocks=blocks)


def test_blocks_must_be_a_list() -> None:
    with pytest.raises(ValueError, match="blocks must be a list"):
        CNN(blocks={"type": "resnet", "channels": 8, "stride": 1})
