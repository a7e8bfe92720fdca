"""A user's own detector, named in tests as ``model.name: detection_factory:tiny_detector``:
torchvision's ``FasterRCNN`` around a two-layer backbone, small enough for unit tests."""

from __future__ import annotations

from torch import nn


def tiny_detector(spec, num_classes: int, width: int = 16, size: int = 64) -> nn.Module:
    """A Faster R-CNN with a 2-convolution backbone (stride 4) for ``num_classes`` (background
    included: ``spec.extra["classes"]`` has one name fewer); images resized to ``size``."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    assert spec.kind == "detection" and len(spec.extra["classes"]) == num_classes - 1
    backbone = nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
        nn.ReLU(),
    )
    backbone.out_channels = width
    return FasterRCNN(
        backbone,
        min_size=size,
        max_size=size,
        rpn_anchor_generator=AnchorGenerator(sizes=((12, 24),), aspect_ratios=((1.0,),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=4, sampling_ratio=2),
        box_head=TwoMLPHead(width * 16, 32),
        box_predictor=FastRCNNPredictor(32, num_classes),
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=32,
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
    )


def returns_a_tensor(spec, num_classes: int) -> nn.Module:
    """A classifier where a detector is expected: refused in one line at its first step."""
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
