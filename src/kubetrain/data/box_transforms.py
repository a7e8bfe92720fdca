"""Transforms that move the boxes: detection samples through ``torchvision.transforms.v2``.

The YAML lists are the classification ones (``data.transforms.train`` / ``.eval``, each entry a
``{name, kwargs}`` class of ``transforms.v2``); here a sample is ``{"image": tv_tensors.Image,
"boxes": tv_tensors.BoundingBoxes, "labels": Tensor}``, so flips, resized crops, affine
transforms and the like move the boxes with the pixels, and ``SanitizeBoundingBoxes`` (added
at the end of every list that has none) drops the boxes a crop left empty, with their labels.
A ``ToDtype(float32, scale=True)`` is added unless the list has one; no ``Normalize``:
torchvision's detectors normalise inside the model (``GeneralizedRCNNTransform``), on 0-1
images. Images are decoded as RGB whatever their stored mode (the detectors take 3 channels).

Batches are what torchvision's detectors take: a list of images (sizes may differ) and a list
of targets ``{"boxes": (N, 4) float32 x1 y1 x2 y2, "labels": (N,) int64, "image_id": int}``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from kubetrain.core.errors import ConfigError
from kubetrain.data.transforms import SpecList, _first_line, _plain, _v2, build_one, decode_image

Target = dict[str, Any]


def record_boxes(record: Mapping[str, Any]) -> np.ndarray:
    """A shard record's boxes as ``(N, 4)`` float32 ``x1, y1, x2, y2``."""
    return np.frombuffer(record["boxes"], dtype=np.float32).reshape(-1, 4)


class BoxTransform:
    """Per-sample callable for ``StreamingDataset(transform=...)``: a detection record in,
    ``(image float tensor (3, H, W) in 0-1, target)`` out; decoding and augmentation run where
    it is called (the DataLoader workers).

    Args:
        specs: the ``{name, kwargs}`` list (``data.transforms.train`` or ``.eval``).
        where: the list's place in the config, for messages.
    """

    def __init__(self, specs: SpecList, where: str = "data.transforms") -> None:
        self.specs, self.where = _plain(specs), where
        self._pipeline: Callable | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pipeline": None}  # rebuilt in the worker

    def pipeline(self) -> Callable:
        if self._pipeline is None:
            v2 = _v2()
            steps = [build_one(s, f"{self.where}[{i}]") for i, s in enumerate(self.specs)]
            names = [s["name"] for s in self.specs]
            if "ToDtype" not in names:
                steps.append(v2.ToDtype(torch.float32, scale=True))
            if "SanitizeBoundingBoxes" not in names:
                steps.append(v2.SanitizeBoundingBoxes())
            self._pipeline = v2.Compose(steps)
        return self._pipeline

    def __call__(self, record: Mapping[str, Any]) -> tuple[torch.Tensor, Target]:
        from torchvision import tv_tensors

        image = decode_image(record["image"], "RGB")
        boxes = tv_tensors.BoundingBoxes(
            torch.from_numpy(record_boxes(record).copy()), format="XYXY",
            canvas_size=tuple(image.shape[-2:]),
        )  # fmt: skip
        labels = torch.as_tensor(np.asarray(record["labels"], dtype=np.int64))
        out = self.pipeline()({"image": tv_tensors.Image(image), "boxes": boxes, "labels": labels})
        target = {
            "boxes": out["boxes"].as_subclass(torch.Tensor).to(torch.float32),
            "labels": out["labels"].to(torch.int64),
            "image_id": int(record["image_id"]),
        }
        return out["image"].as_subclass(torch.Tensor), target


def collate_detection(samples: list[tuple[torch.Tensor, Target]]):
    """A detection batch: ``(list of images, list of targets)``, sizes kept (what
    torchvision's detection reference calls ``collate_fn``)."""
    return [s[0] for s in samples], [s[1] for s in samples]


def blank_record(size: tuple[int, int] = (48, 64)) -> dict[str, Any]:
    """A gray image of ``size`` (H, W) with one box, as a shard record (to check transforms)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), (128, 128, 128)).save(buf, format="PNG")
    box = np.array([[4, 4, size[1] // 2, size[0] // 2]], dtype=np.float32)
    return {"image": buf.getvalue(), "boxes": box.tobytes(), "labels": np.array([1]),
            "image_id": 0}  # fmt: skip


def check_box_transforms(*transforms: BoxTransform) -> None:
    """Build every list and run it once on a blank image with a box, so a wrong name or
    argument fails at start-up in one line naming the list.

    Raises:
        ConfigError: naming the list and the first problem.
    """
    for transform in transforms:
        try:
            image, target = transform(blank_record())
        except ConfigError:
            raise
        except (TypeError, ValueError, RuntimeError, KeyError) as err:
            raise ConfigError(f"config error: {transform.where}: {_first_line(err)}") from None
        if image.dim() != 3 or image.shape[0] != 3 or target["boxes"].shape[-1] != 4:
            raise ConfigError(
                f"config error: {transform.where}: gives an image of shape "
                f"{tuple(image.shape)}; detection needs (3, H, W) images and boxes"
            )
