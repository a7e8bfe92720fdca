"""The networks: small models built from a name and the data's shape. Knows nothing of distribution."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from kubetrain.core.errors import ConfigError
from kubetrain.core.records import NetworkSpec
from kubetrain.models.config import ModelConfig, family_of


def mlp(input_shape: list[int], num_classes: int, cfg: ModelConfig) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for hidden in cfg.hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: list[int], num_classes: int, cfg: ModelConfig) -> nn.Module:
    if len(input_shape) != 3:
        raise ConfigError(
            f"config error: model.name: 'cnn' needs image data (C,H,W); this data has shape "
            f"{input_shape} (set data.image_shape for images stored as columns, or use 'mlp')"
        )
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out in cfg.channels:
        layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.ReLU()]
        channels = out
    if min(height, width) >= 2:
        layers.append(nn.MaxPool2d(2))
        height, width = height // 2, width // 2
    layers += [nn.Flatten(), nn.Linear(channels * height * width, cfg.hidden_sizes[0]), nn.ReLU()]
    if cfg.dropout:
        layers.append(nn.Dropout(cfg.dropout))
    layers.append(nn.Linear(cfg.hidden_sizes[0], num_classes))
    return nn.Sequential(*layers)


REGISTRY: dict[str, Callable[[list[int], int, ModelConfig], nn.Module]] = {"mlp": mlp, "cnn": cnn}


def build_model(cfg: ModelConfig, input_shape: list[int], num_classes: int) -> nn.Module:
    """Build ``cfg.name`` for inputs of ``input_shape`` (without batch) and ``num_classes``;
    ``torchvision:``, ``timm:`` and ``module:factory`` names are built by ``models.vision``."""
    if family_of(cfg.name) not in REGISTRY:
        from kubetrain.models import vision

        return vision.build_model(cfg, list(input_shape), num_classes)
    return REGISTRY[cfg.name](list(input_shape), num_classes, cfg)


def model_spec(cfg: ModelConfig, input_shape: list[int], num_classes: int) -> NetworkSpec:
    """What ``build_from_spec`` needs to rebuild the network in another process."""
    return NetworkSpec(
        config=cfg.model_dump(mode="json"), input_shape=list(input_shape), num_classes=num_classes
    )


def build_from_spec(spec: NetworkSpec) -> nn.Module:
    """The network described by ``model_spec`` (untrained: load its weights next).

    The initial ``model.weights`` are not read again: the trained weights replace them, and the
    process rebuilding the model (quantize, evaluate, a pod) may not reach that file."""
    config = {**spec.config, "weights": None, "freeze_backbone": False}
    if spec.detection is not None:  # a detector (kubetrain.models.detection): its classes
        from kubetrain.models.detection import build_detector

        return build_detector(ModelConfig(**config), spec.detection.classes)
    if spec.text is not None:  # a text model (kubetrain.models.text): vocabulary, special ids
        from kubetrain.models.text import build_text_network

        return build_text_network(ModelConfig(**config), spec.text)
    if spec.num_classes is None:
        raise ConfigError(f"config error: model.name {spec.config.get('name')!r}: no outputs")
    return build_model(ModelConfig(**config), spec.input_shape, spec.num_classes)
