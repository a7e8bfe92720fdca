"""Detectors: torchvision's detection builders and a user's own factory, with the class head
sized to the data, initial weights for a backbone or a whole detector, a frozen backbone.

``model.name`` picks the kind, as for classification:

- ``torchvision:<builder>``: a builder of ``torchvision.models.detection``
  (``fasterrcnn_mobilenet_v3_large_320_fpn``, ``fasterrcnn_resnet50_fpn_v2``,
  ``retinanet_resnet50_fpn_v2``, ``fcos_resnet50_fpn``, ``ssdlite320_mobilenet_v3_large``, ...),
  built with ``num_classes = K + 1`` (torchvision's label 0 is the background; the data's
  labels are ``1..K``), no hub weights (``weights_backbone`` too is off unless torch's hub
  cache holds it) and ``model.kwargs`` (``min_size``, ``max_size``, ``box_batch_size_per_image``
  ...: the model class's own arguments);
- ``package.module:factory``: ``factory(spec, num_classes, **model.kwargs)`` with
  ``spec.kind == "detection"``, ``spec.extra["classes"]`` the class names and ``num_classes``
  ``K + 1``; it returns a module that behaves as torchvision's detectors do: in training mode
  ``model(images, targets)`` is a dict of loss tensors, in eval mode ``model(images)`` a list of
  ``{"boxes", "labels", "scores"}`` (``images``: a list of 0-1 float tensors (3, H, W)).

``model.weights`` (a local path or URI, state dict or ``.safetensors``): a whole detector's
weights (every tensor must fit, except the class head's when its size differs), or a
classification backbone's (a ``resnet50`` or ``mobilenet_v3_large`` state dict: its tensors go
into ``backbone.body``; the classifier's are left out). ``model.freeze_backbone`` freezes
``backbone.body`` (its batch norms become ``FrozenBatchNorm2d``, as torchvision's fine-tuning
does); the FPN and the heads train. Nothing here knows of distribution.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kubetrain.core.errors import ConfigError
from kubetrain.models.config import FAMILIES, ModelConfig, family_of
from kubetrain.models.vision import (
    WEIGHTS_HINT,
    InputSpec,
    _call,
    _did_you_mean,
    call_factory,
    read_state_dict,
)

log = logging.getLogger(__name__)

# Module-name prefixes of the class-scoring layers per torchvision detector family: the tensors
# a whole detector's weights may leave out (their size follows the number of classes).
CLASS_HEADS = (
    "roi_heads.box_predictor.",  # Faster R-CNN (bbox_pred is 4 x classes)
    "head.classification_head.cls_logits.",  # RetinaNet, FCOS
    "head.classification_head.module_list.",  # SSD, SSDlite
)


def detection_builders() -> list[str]:
    """torchvision's detection builders (boxes only: mask and keypoint models are left out)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models.detection)
    return [n for n in names if not n.startswith(("maskrcnn", "keypointrcnn"))]


def build_detector(
    cfg: ModelConfig, classes: list[str], storage_options: Mapping[str, Any] | None = None
) -> nn.Module:
    """The detector ``cfg`` names for ``len(classes)`` categories (labels ``1..K``), with
    ``cfg.weights`` loaded and the backbone frozen if asked.

    Args:
        cfg: the ``model`` section.
        classes: the category names (the dataset's ``classes``).
        storage_options: fsspec options for a remote ``cfg.weights``.

    Returns:
        The model, in training mode.

    Raises:
        ConfigError: no torchvision, an unknown builder (or a classification one), hub weights
            asked for, a factory that fails, weights that do not fit, no backbone to freeze.
    """
    family, target = family_of(cfg.name), cfg.name.partition(":")[2]
    num_classes = len(classes) + 1
    if "detection" not in FAMILIES[family].kinds:
        raise ConfigError(
            f"config error: model.name: {cfg.name!r} is not a detector; use "
            "torchvision:<detection builder> or package.module:factory"
        )
    if family == "torchvision":
        model = _torchvision_detector(target, num_classes, dict(cfg.kwargs))
    else:
        spec = InputSpec((3,), kind="detection", extra={"classes": list(classes)})
        model = call_factory(cfg.name, spec, num_classes, **dict(cfg.kwargs))
    if cfg.weights:
        load_detection_weights(model, cfg.weights, storage_options)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    return model


def _torchvision_detector(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import torchvision
    except ImportError as err:
        raise ConfigError(
            f"config error: model.name: torchvision:{name} needs torchvision "
            f"(pip install 'kubetrain[vision]'): {err}"
        ) from None
    known = detection_builders()
    if name not in known:
        raise ConfigError(
            f"config error: model.name: {name!r} is not a torchvision detection builder"
            f"{_did_you_mean(name, known)} (known: {', '.join(known)})"
        )
    for key in ("weights", "pretrained"):
        if kwargs.pop(key, None):
            raise ConfigError(f"config error: model.kwargs.{key}: {WEIGHTS_HINT}")
    _check_kwargs(name, kwargs)
    backbone = kwargs.pop("weights_backbone", None)
    kwargs["weights_backbone"] = _cached_backbone(name, backbone) if backbone else None
    return _call(
        torchvision.models.get_model, f"torchvision:{name}", name, weights=None,
        num_classes=num_classes, **kwargs,
    )  # fmt: skip


def _check_kwargs(builder: str, kwargs: dict[str, Any]) -> None:
    """Refuse a keyword argument neither the builder nor the model class it builds takes:
    torchvision's detectors pass unknown ones on to ``**kwargs`` that ignore them, so a typo
    (``min_sizes``) would train at the default size without a word.

    Raises:
        ConfigError: naming the argument, with the closest known ones.
    """
    import inspect

    import torchvision
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.ssd import SSD
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    cls = {"fasterrcnn": FasterRCNN, "retinanet": RetinaNet, "fcos": FCOS, "ssd": SSD}
    model_class = next((c for prefix, c in cls.items() if builder.startswith(prefix)), None)
    sources = [torchvision.models.get_model_builder(builder), GeneralizedRCNNTransform.__init__]
    if model_class is not None:
        sources.append(model_class.__init__)
    if builder.startswith("ssdlite"):  # its kwargs reach the MobileNetV3 backbone
        from torchvision.models import mobilenetv3

        sources += [mobilenetv3._mobilenet_v3_conf, mobilenetv3.MobileNetV3.__init__]
    known = {n for fn in sources for n in inspect.signature(fn).parameters} - {"self", "kwargs"}
    for key in kwargs:
        if key not in known:
            raise ConfigError(
                f"config error: model.kwargs.{key}: torchvision:{builder} takes no {key!r}"
                f"{_did_you_mean(key, sorted(known))}"
            )


def _cached_backbone(builder: str, value: Any):
    """A backbone weights enum member whose file is already in torch's hub cache (nothing is
    downloaded)."""
    import inspect
    import os

    import torchvision

    fn = torchvision.models.get_model_builder(builder)
    annotation = inspect.signature(fn).parameters["weights_backbone"].annotation
    enum_name = str(annotation).split("[")[-1].split("]")[0].split(".")[-1].strip("'\" ")
    enum = getattr(torchvision.models, enum_name, None)
    member = str(value).rsplit(".", 1)[-1]
    if enum is None or member not in getattr(enum, "__members__", {}):
        raise ConfigError(f"config error: model.kwargs.weights_backbone: {value!r} is not known")
    weights = enum[member]
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.exists(cached):
        raise ConfigError(f"config error: model.kwargs.weights_backbone: {value!r}: {WEIGHTS_HINT}")
    return weights


def _backbone_body(model: nn.Module) -> nn.Module | None:
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        return None
    for name in ("body", "features"):  # FPN backbones; SSD's feature extractors
        inner = getattr(backbone, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return backbone


def load_detection_weights(
    model: nn.Module, uri: str, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Load ``uri`` into ``model``: a whole detector's state dict (the class head may differ in
    size: it keeps its fresh initialisation) or a classification backbone's (into
    ``backbone.body``; a ``features.`` prefix, as MobileNet writes it, is matched too).

    Raises:
        ConfigError: the file does not fit the detector or its backbone (naming what is off).
    """
    state = read_state_dict(uri, storage_options)
    own = model.state_dict()
    matched = sum(k in own for k in state)
    if matched and matched >= len(state) / 2:  # a detector's keys
        _load_detector(model, uri, state)
    else:
        _load_backbone(model, uri, state)


def _load_detector(model: nn.Module, uri: str, state: Mapping[str, torch.Tensor]) -> None:
    """A whole detector's weights; a class head of another size keeps its fresh weights."""
    own = model.state_dict()
    fitted: dict[str, torch.Tensor] = {}
    resized: list[str] = []
    bad: list[str] = []
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            (resized if key.startswith(CLASS_HEADS) else bad).append(key)
            continue
        fitted[key] = value
    result = model.load_state_dict(fitted, strict=False)
    missing = [k for k in result.missing_keys if k not in resized]
    if bad or missing or result.unexpected_keys:
        which = (bad or missing or result.unexpected_keys)[:3]
        raise ConfigError(
            f"config error: model.weights: {uri}: does not fit {type(model).__name__} "
            f"({'shapes differ' if bad else 'keys missing' if missing else 'extra keys'}: "
            f"{', '.join(which)})"
        )
    if resized:
        log.info("model.weights: %s: class head re-initialised for the data's classes", uri)


def _load_backbone(model: nn.Module, uri: str, state: Mapping[str, torch.Tensor]) -> None:
    """A classification backbone's weights into the detector's ``backbone.body``."""
    body = _backbone_body(model)
    if body is None:
        raise ConfigError(f"config error: model.weights: {uri}: the model has no backbone")
    body_own = body.state_dict()
    fitted = {}
    for key, target in body_own.items():
        for candidate in (key, f"features.{key}"):
            found = state.get(candidate)
            if found is not None and found.shape == target.shape:
                fitted[key] = found
                break
    if len(fitted) < len(body_own):
        lacking = [k for k in body_own if k not in fitted]
        raise ConfigError(
            f"config error: model.weights: {uri}: neither a {type(model).__name__} nor its "
            f"backbone's weights ({len(lacking)} of the backbone's {len(body_own)} tensors not "
            f"found, e.g. {lacking[0]})"
        )
    body.load_state_dict(fitted)
    log.info("model.weights: %s: backbone loaded (%d tensors)", uri, len(fitted))


def freeze_backbone(model: nn.Module) -> None:
    """Freeze the backbone's body: no gradients, batch norms as ``FrozenBatchNorm2d``.

    Raises:
        ConfigError: the model has no ``backbone`` (a factory's own layout).
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = _backbone_body(model)
    if body is None:
        raise ConfigError(
            "config error: model.freeze_backbone: the model has no 'backbone' module to freeze"
        )
    for name, module in list(body.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
            parent, _, child = name.rpartition(".")
            setattr(body.get_submodule(parent) if parent else body, child, frozen)
    for param in body.parameters():
        param.requires_grad = False


def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


def small_fasterrcnn(
    spec: InputSpec,
    num_classes: int,
    width: int = 32,
    size: int = 128,
    anchor_sizes: tuple[int, ...] = (16, 32, 64),
    **kwargs: Any,
) -> nn.Module:
    """A Faster R-CNN (torchvision's ``FasterRCNN``) around a small 6-convolution backbone of
    stride 8, trained from scratch in minutes on a CPU: for small images with objects of
    roughly 10-100 px (the detection recipe's scenes). Used as
    ``model.name: kubetrain.models.detection:small_fasterrcnn``; ``kwargs`` go to
    ``FasterRCNN`` (``box_batch_size_per_image``, ``rpn_post_nms_top_n_train``, ...).

    Args:
        spec: the input spec (``spec.extra["classes"]``: the class names).
        num_classes: classes with the background (K + 1).
        width: channels of the first block (doubled twice).
        size: images are resized so their shorter side is ``size`` (longer side at most
            ``size`` too).
        anchor_sizes: anchor box sides in pixels (aspect ratios 0.5, 1, 2).
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    w = int(width)
    backbone = nn.Sequential(
        *_conv(3, w, 2), *_conv(w, w, 1), *_conv(w, 2 * w, 2), *_conv(2 * w, 2 * w, 1),
        *_conv(2 * w, 4 * w, 2), *_conv(4 * w, 4 * w, 1),
    )  # fmt: skip
    backbone.out_channels = 4 * w  # type: ignore[assignment]  # what FasterRCNN reads
    # 64 sampled proposals an image and one RoIAlign sample a bin: RoIAlign's backward on the
    # CPU took 60 % of a step with torchvision's 512 and 2 (measured: 2.6 s -> 0.7 s a step).
    settings = {
        "min_size": size, "max_size": size, "box_batch_size_per_image": 64,
        "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
        "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 150, **kwargs,
    }  # fmt: skip
    return FasterRCNN(
        backbone,
        rpn_anchor_generator=AnchorGenerator(
            sizes=(tuple(int(s) for s in anchor_sizes),), aspect_ratios=((0.5, 1.0, 2.0),)
        ),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=1),
        box_head=TwoMLPHead(4 * w * 49, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        **settings,
    )
