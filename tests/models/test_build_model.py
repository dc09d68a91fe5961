"""build_model / from_arch (bigopt/models/__init__.py)."""

import pytest

from bigopt.models import CNN, GPT, MLP, build_model, from_arch


@pytest.mark.parametrize(("kind", "cls"), [("gpt", GPT), ("cnn", CNN), ("mlp", MLP)])
def test_build_model_by_kind(kind: str, cls: type) -> None:
    assert type(build_model(kind)) is cls


def test_build_model_passes_config() -> None:
    model = build_model("mlp", in_features=784, hidden=[32])
    assert model.arch() == {
        "kind": "mlp",
        "in_features": 784,
        "hidden": [32],
        "num_classes": 10,
        "dropout": 0.0,
    }


def test_unknown_kind_names_it_and_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="'transformer'.*cnn, gpt, mlp"):
        build_model("transformer")


def test_unknown_kwarg_names_it_and_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="'gpt'.*'n_layers'.*allowed.*n_layer"):
        build_model("gpt", n_layers=2)
    with pytest.raises(ValueError, match="'hiden'.*hidden"):
        build_model("mlp", hiden=(8,))


def test_from_arch_builds_and_round_trips() -> None:
    arch = {
        "kind": "cnn",
        "image_size": 16,
        "stem_channels": 8,
        "blocks": [{"type": "resnet", "channels": 16, "stride": 2}],
    }
    model = from_arch(arch)
    assert isinstance(model, CNN)
    assert from_arch(model.arch()).arch() == model.arch()
    assert arch["kind"] == "cnn"  # the caller's dict is not consumed


def test_from_arch_rejects_malformed_input() -> None:
    with pytest.raises(ValueError, match="missing 'kind'.*cnn, gpt, mlp"):
        from_arch({"hidden": [8]})
    with pytest.raises(ValueError, match="arch must be a dict"):
        from_arch(["mlp"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'width'"):
        from_arch({"kind": "mlp", "width": 8})
