"""A user's own model, named in tests as ``model.name: vision_factory:tiny_net``."""

from __future__ import annotations

from torch import nn


def tiny_net(spec, num_classes: int, width: int = 8) -> nn.Module:
    """A small CNN for ``spec.shape`` = [C, H, W] inputs; ``width`` comes from model.kwargs."""
    return nn.Sequential(
        nn.Conv2d(spec.channels, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def not_a_model(spec, num_classes: int):
    return "a string"


NOT_CALLABLE = 3
