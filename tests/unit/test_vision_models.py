"""Models from outside kubetrain: torchvision builders, timm, a user's factory; fine-tuning from a
weights file with the head resized and the backbone frozen."""

from __future__ import annotations

import pytest
import torch

from kubetrain.core.errors import ConfigError
from kubetrain.models import build_model
from kubetrain.models.config import ModelConfig
from kubetrain.pipeline.config import load_config

pytestmark = pytest.mark.vision


def model_cfg(name, **kw) -> ModelConfig:
    return ModelConfig(name=name, **kw)


@pytest.mark.parametrize(
    "name",
    ["mlp", "cnn", "torchvision:resnet18", "timm:resnet18", "my_pkg.models:build", "m:f"],
)
def test_model_names_of_every_kind_validate(name):
    assert ModelConfig(name=name).name == name


@pytest.mark.parametrize("name", ["resnet18", "torchvision:", "pkg.mod", "a b:c", "pkg:mod:x"])
def test_a_malformed_model_name_is_a_config_error(name):
    with pytest.raises(ConfigError, match=r"^config error: model.name: "):
        load_config(overrides=[f"model.name={name}"])


@pytest.mark.parametrize(
    "override", ["model.weights=w.pt", "model.freeze_backbone=true", "model.kwargs={depth: 2}"]
)
def test_fine_tuning_fields_are_refused_for_the_builtin_networks(override):
    with pytest.raises(
        ConfigError, match=r"applies to torchvision:, timm:, hf: and module:factory"
    ):
        load_config(overrides=["model.name=mlp", override])


# -- torchvision --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tv():
    return pytest.importorskip("torchvision", reason="torchvision models need the vision extra")


@pytest.mark.parametrize(
    ("name", "channels"),
    [("torchvision:resnet18", 3), ("torchvision:mobilenet_v3_small", 3),
     ("torchvision:squeezenet1_1", 3), ("torchvision:resnet18", 1)],
    ids=["resnet18", "mobilenet_v3_small", "squeezenet-conv-head", "resnet18-grayscale"],
)  # fmt: skip
def test_torchvision_builders_build_and_run_on_32px(tv, name, channels):
    model = build_model(model_cfg(name), [channels, 32, 32], 7)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, 32, 32))
    assert out.shape == (2, 7)


def test_builder_kwargs_reach_the_builder(tv):
    model = build_model(model_cfg("torchvision:mobilenet_v3_small", kwargs={"dropout": 0.5}), [3, 32, 32], 4)  # fmt: skip
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model.modules())


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("torchvision:resnet19", {}, r"'resnet19' is not a torchvision classification builder; did you mean resnet18"),
        ("torchvision:fasterrcnn_resnet50_fpn", {}, r"not a torchvision classification builder"),
        ("torchvision:resnet18", {"weights": "DEFAULT"}, r"model.kwargs.weights: 'DEFAULT': .*pass model.weights"),
        ("torchvision:resnet18", {"weights": "NOPE"}, r"'NOPE' is not one of resnet18's weights"),
        ("torchvision:resnet18", {"pretrained": True}, r"pass model.weights"),
        ("torchvision:resnet18", {"no_such_arg": 1}, r"torchvision:resnet18 with kwargs .*no_such_arg"),
    ],
    ids=["typo", "detection", "hub-weights", "unknown-weights", "pretrained", "bad-kwarg"],
)  # fmt: skip
def test_torchvision_mistakes_are_one_line(tv, name, kwargs, message, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: nothing downloaded
    with pytest.raises(ConfigError, match=message) as err:
        build_model(model_cfg(name, kwargs=kwargs), [3, 32, 32], 10)
    assert "\n" not in str(err.value)


def test_hub_weights_already_in_torch_hub_cache_are_used(tv, monkeypatch, tmp_path):
    """What a user (or an image) put in the hub cache beforehand is read; nothing is fetched."""
    import os

    from torchvision.models import ResNet18_Weights, resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(ResNet18_Weights.DEFAULT.url)
    cached.parent.mkdir(parents=True)
    reference = resnet18()
    torch.save(reference.state_dict(), cached)
    model = build_model(model_cfg("torchvision:resnet18", kwargs={"weights": "DEFAULT"}), [3, 32, 32], 10)  # fmt: skip
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 10


# -- timm ---------------------------------------------------------------------------------------
def test_timm_models_build_with_channels_and_classes():
    pytest.importorskip("timm", reason="timm is an optional extra")
    model = build_model(model_cfg("timm:resnet18"), [1, 32, 32], 5)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 5)
    with pytest.raises(ConfigError, match=r"'resnet19x' is not a timm model"):
        build_model(model_cfg("timm:resnet19x"), [3, 32, 32], 5)


# -- package.module:factory ---------------------------------------------------------------------
def test_a_factory_gets_the_input_spec_classes_and_kwargs():
    model = build_model(model_cfg("vision_factory:tiny_net", kwargs={"width": 5}), [3, 32, 32], 6)
    assert model[0].out_channels == 5
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 6)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_package.models:build", r"cannot import module 'no_such_package.models' \(No module named 'no_such_package'\)"),
        ("vision_factory:missing", r"module 'vision_factory' has no attribute 'missing'"),
        ("vision_factory:NOT_CALLABLE", r"module 'vision_factory' has a non-callable attribute 'NOT_CALLABLE'"),
        ("vision_factory:not_a_model", r"vision_factory:not_a_model returned a str, not a torch.nn.Module"),
    ],
    ids=["missing-module", "missing-attribute", "not-callable", "not-a-module"],
)  # fmt: skip
def test_factory_mistakes_are_one_line(name, message):
    with pytest.raises(ConfigError, match=message):
        build_model(model_cfg(name), [3, 32, 32], 4)


def test_a_factory_refusing_kwargs_is_one_line():
    with pytest.raises(ConfigError, match=r"vision_factory:tiny_net with kwargs \{'depth': 3\}"):
        build_model(model_cfg("vision_factory:tiny_net", kwargs={"depth": 3}), [3, 32, 32], 4)


# -- weights, head, frozen backbone -------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_weights_load_with_a_resized_head_and_a_frozen_backbone(tv, tmp_path, fmt):
    source = build_model(model_cfg("torchvision:resnet18"), [3, 32, 32], 1000)
    state = source.state_dict()
    path = tmp_path / f"w.{fmt}"
    if fmt == "pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    cfg = model_cfg("torchvision:resnet18", weights=str(path), freeze_backbone=True)
    model = build_model(cfg, [3, 32, 32], 10)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_mean, source.layer4[1].bn2.running_mean)
    assert model.fc.out_features == 10
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    loss = model(torch.rand(2, 3, 32, 32)).sum()
    loss.backward()
    assert model.fc.weight.grad is not None and model.conv1.weight.grad is None


def test_weights_of_another_model_are_one_line(tv, tmp_path):
    other = build_model(model_cfg("torchvision:mobilenet_v3_small"), [3, 32, 32], 10)
    torch.save(other.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"model.weights: .*w.pt lacks: conv1.weight"):
        build_model(model_cfg("torchvision:resnet18", weights=str(tmp_path / "w.pt")), [3, 32, 32], 10)  # fmt: skip
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk.pt: not a state dict"):
        build_model(model_cfg("torchvision:resnet18", weights=str(tmp_path / "junk.pt")), [3, 32, 32], 10)  # fmt: skip
    with pytest.raises(ConfigError, match=r"nothing.pt: cannot read"):
        build_model(model_cfg("torchvision:resnet18", weights=str(tmp_path / "nothing.pt")), [3, 32, 32], 10)  # fmt: skip


def test_a_factory_model_fine_tunes_and_freezes_too(tmp_path):
    source = build_model(model_cfg("vision_factory:tiny_net"), [3, 32, 32], 3)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    cfg = model_cfg("vision_factory:tiny_net", weights=str(tmp_path / "w.pt"), freeze_backbone=True)
    model = build_model(cfg, [3, 32, 32], 8)
    assert torch.equal(model[0].weight, source[0].weight)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["4.weight", "4.bias"]


def test_a_rebuild_from_the_spec_does_not_read_the_initial_weights_again(tmp_path):
    from kubetrain.models import build_from_spec, model_spec

    source = build_model(model_cfg("vision_factory:tiny_net"), [3, 32, 32], 3)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    cfg = model_cfg("vision_factory:tiny_net", weights=str(tmp_path / "w.pt"), freeze_backbone=True)
    spec = model_spec(cfg, [3, 32, 32], 3)
    (tmp_path / "w.pt").unlink()  # e.g. the evaluate pod cannot see the training's input file
    rebuilt = build_from_spec(spec)
    rebuilt.load_state_dict(source.state_dict())
    assert all(p.requires_grad for p in rebuilt.parameters())
