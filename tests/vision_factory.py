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


def dies(spec, num_classes: int):
    """A model whose construction kills its own process, as the OOM killer would."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


class _WithUnusedHead(nn.Module):
    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes))
        self.unused = nn.Linear(1, 1)  # registered last, never reached by the loss

    def forward(self, x):
        return self.body(x)


def unused_last_parameter(spec, num_classes: int) -> nn.Module:
    """A model whose last parameter gets no gradient (an aux head the loss does not use)."""
    import math

    return _WithUnusedHead(math.prod(spec.shape), num_classes)


def head_of(spec, num_classes: int, extra: int = 0) -> nn.Module:
    """A linear model whose head gives ``num_classes + extra`` outputs (``extra`` from
    model.kwargs: more or fewer outputs than the data has classes)."""
    import math

    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(spec.shape), num_classes + extra))


def rgb_only(spec, num_classes: int) -> nn.Module:
    """A network that takes 3-channel images whatever ``spec`` says."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))
