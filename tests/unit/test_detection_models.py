"""Detectors: torchvision's builders with the class head sized to the data and no download,
model.weights for a whole detector (its class head re-initialised when the classes differ) or a
classification backbone, a frozen backbone, and the refusals, each in one line."""

from __future__ import annotations

import pytest

pytest.importorskip("torchvision", reason="detectors need the vision extra")

import torch
from torch import nn

from kubetrain.core.errors import ConfigError
from kubetrain.models.config import ModelConfig
from kubetrain.models.detection import build_detector, small_fasterrcnn

pytestmark = pytest.mark.vision

CLASSES = ["a", "b", "c"]
SMALL = {"min_size": 64, "max_size": 64}


def _build(name: str, **kw) -> nn.Module:
    return build_detector(ModelConfig(name=name, **kw), CLASSES)


@pytest.mark.parametrize(
    ("builder", "head"),
    [
        ("fasterrcnn_mobilenet_v3_large_320_fpn", "roi_heads.box_predictor.cls_score"),
        ("ssdlite320_mobilenet_v3_large", None),
    ],
    ids=["faster-rcnn", "ssdlite"],
)
def test_torchvision_builders_get_k_plus_one_classes(builder, head):
    model = _build(f"torchvision:{builder}", kwargs=SMALL if "rcnn" in builder else {})
    if head is not None:
        assert model.get_submodule(head).out_features == len(CLASSES) + 1
    else:
        assert model.head.classification_head.num_columns == len(CLASSES) + 1
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 48, 64)])
    assert {"boxes", "labels", "scores"} <= set(out[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": "DEFAULT"}, "model.kwargs.weights: kubetrain downloads no weights"),
        ({"weights_backbone": "IMAGENET1K_V1"}, "model.kwargs.weights_backbone: 'IMAGENET1K_V1'"),
        (
            {"min_sizes": 3},
            r"model.kwargs.min_sizes: .* takes no 'min_sizes'; did you mean min_size",
        ),
    ],
    ids=["hub-weights", "hub-backbone", "unknown-kwarg"],
)
def test_refusals_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        _build("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", kwargs=kwargs)
    assert "\n" not in str(info.value)


def test_whole_detector_weights_keep_all_but_a_resized_class_head(tmp_path):
    from kubetrain.models.vision import InputSpec

    torch.manual_seed(0)
    five = small_fasterrcnn(InputSpec((3,), "detection", {"classes": list("vwxyz")}), 6, width=8)
    path = tmp_path / "detector.pt"
    torch.save(five.state_dict(), path)
    model = _build("kubetrain.models.detection:small_fasterrcnn", kwargs={"width": 8},
                   weights=str(path))  # fmt: skip
    own, theirs = model.state_dict(), five.state_dict()
    for key, value in own.items():
        if key.startswith("roi_heads.box_predictor."):
            assert value.shape[0] != theirs[key].shape[0]  # 4 classes here, 6 there
        else:
            assert torch.equal(value, theirs[key]), key


def test_backbone_weights_from_a_classifier_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(0)
    classifier = torchvision.models.mobilenet_v3_large()
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(classifier.state_dict(), path)
    model = _build("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", kwargs=SMALL,
                   weights=str(path))  # fmt: skip
    body = model.backbone.body.state_dict()
    mine = classifier.state_dict()
    assert all(torch.equal(v, mine[f"features.{k}"]) for k, v in body.items())


def test_weights_that_fit_neither_are_one_line(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"x.weight": torch.zeros(3)}, path)
    with pytest.raises(ConfigError, match="neither a FasterRCNN nor its backbone's weights"):
        _build("kubetrain.models.detection:small_fasterrcnn", weights=str(path))


def test_a_frozen_backbone_trains_the_fpn_and_heads_only():
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = _build("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", kwargs=SMALL,
                   freeze_backbone=True)  # fmt: skip
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.parameters())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    assert all(p.requires_grad for p in model.roi_heads.parameters())


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("torchvision:resnet18", "not a torchvision detection builder"),
        ("torchvision:fasterrcnn_resnet5_fpn", "did you mean fasterrcnn_resnet50_fpn"),
        ("timm:resnet18", "'timm:resnet18' is not a detector"),
    ],
    ids=["classifier", "typo", "timm"],
)
def test_classifiers_are_not_detectors(name, message):
    with pytest.raises(ConfigError, match=message):
        _build(name)
