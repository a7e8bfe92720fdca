"""A detector of your own, as ``model.name: my_detector:build`` takes it (with this folder on
``PYTHONPATH``): torchvision's ``FCOS`` (anchor-free) around a small residual backbone of
stride 8, written as a user would write it, with nothing from kubetrain but the call's shape.

    PYTHONPATH=examples/detection kubetrain run --config detection \
        --set data.source=/tmp/shapes --set model.name=my_detector:build
"""

from __future__ import annotations

from typing import Any

from torch import nn


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x) + self.skip(x))


def build(spec: Any, num_classes: int, width: int = 16, size: int = 128, **kwargs: Any):
    """``spec`` is kubetrain's input spec (unused here); ``num_classes`` counts the background."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    backbone = nn.Sequential(_Block(3, width, 2), _Block(width, 2 * width, 2),
                             _Block(2 * width, 4 * width, 2))  # fmt: skip
    backbone.out_channels = 4 * width
    anchors = AnchorGenerator(sizes=((8,),), aspect_ratios=((1.0,),))  # one point a cell (stride 8)
    return FCOS(backbone, num_classes, min_size=size, max_size=size, anchor_generator=anchors,
                **kwargs)  # fmt: skip
