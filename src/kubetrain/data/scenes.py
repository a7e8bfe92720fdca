"""Detection scenes composed from Fashion-MNIST items: real object appearance, exact boxes.

Each scene is a square grayscale canvas of 96-128 px with 1-4 clothing items from Debian's
``dataset-fashion-mnist`` (a few scenes have none), each scaled by 0.9-2x and placed at random;
items may overlap (at most ``MAX_OVERLAP`` IoU with an earlier one), a later item covering an
earlier one. An item's box is the extent of its non-background pixels, so boxes are exact. The
scenes are written once as a COCO folder (``annotations/instances_all.json`` + ``images/``) in
``kubetrain``'s cache and read by the COCO reader like any user's folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from kubetrain.data.idx import FASHION_MNIST_CLASSES, fashion_mnist_files, read_idx

log = logging.getLogger(__name__)

SCENES = "fashion-mnist-scenes"
SCENES_VERSION = 1  # bump when the composition changes: a new cache folder
CANVAS = (96, 128)  # side of the square canvas, pixels (inclusive range)
ITEMS = (1, 4)
SCALE = (0.9, 2.0)
EMPTY_SHARE = 0.04  # scenes without any item
MAX_OVERLAP = 0.3  # IoU an item may have with an earlier one
FOREGROUND = 24  # pixel value above which an item's pixel is not background


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def compose(items: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """One scene: ``(canvas uint8 (S, S), boxes (N, 4) x1 y1 x2 y2, class ids (N,))``.

    Args:
        items: Fashion-MNIST images ``(M, 28, 28)`` to draw from.
        labels: their classes ``(M,)``.
        rng: the scene's random stream.
    """
    from PIL import Image

    side = int(rng.integers(CANVAS[0], CANVAS[1] + 1))
    canvas = rng.integers(0, 16, (side, side)).astype(np.uint8)  # faint sensor noise
    count = 0 if rng.random() < EMPTY_SHARE else int(rng.integers(ITEMS[0], ITEMS[1] + 1))
    boxes: list[np.ndarray] = []
    classes: list[int] = []
    for _ in range(count):
        k = int(rng.integers(len(items)))
        size = round(28 * float(rng.uniform(*SCALE)))
        item = np.asarray(Image.fromarray(items[k]).resize((size, size), Image.Resampling.BILINEAR))
        mask = item > FOREGROUND
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        for _attempt in range(10):
            x0, y0 = (int(v) for v in rng.integers(0, side - size + 1, 2))
            box = np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1],
                           dtype=np.float64)  # fmt: skip
            if all(_iou(box, b) <= MAX_OVERLAP for b in boxes):
                break
        else:
            continue  # no room left for this item
        region = canvas[y0 : y0 + size, x0 : x0 + size]
        region[mask] = item[mask]
        boxes.append(box)
        classes.append(int(labels[k]))
    return canvas, np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(classes, np.int64)


def write_scenes(out_dir: Path, count: int, seed: int = 0) -> Path:
    """Write ``count`` scenes as a COCO folder at ``out_dir``; returns ``out_dir``.

    Category ids are 1-10 (Fashion-MNIST's labels + 1); the items come from its training file.

    Raises:
        DataError: Fashion-MNIST is not installed.
    """
    from PIL import Image

    images_file, labels_file = fashion_mnist_files("train")
    items, labels = read_idx(images_file), read_idx(labels_file)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(FASHION_MNIST_CLASSES)],
    }
    for i in range(count):
        canvas, boxes, classes = compose(items, labels, np.random.default_rng([seed, i]))
        name = f"{i:06d}.png"
        Image.fromarray(canvas).save(images_dir / name)
        coco["images"].append({"id": i + 1, "file_name": name, "width": canvas.shape[1],
                               "height": canvas.shape[0]})  # fmt: skip
        for box, cls in zip(boxes, classes, strict=True):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": int(cls) + 1,
                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0,
            })  # fmt: skip
    (out_dir / "annotations").mkdir(exist_ok=True)
    (out_dir / "annotations" / "instances_all.json").write_text(json.dumps(coco))
    return out_dir


def scenes_folder(cache: Path, count: int, seed: int = 0) -> Path:
    """The COCO folder of ``count`` scenes in the folder ``cache`` (written once, atomically:
    a folder that exists is complete).

    Raises:
        DataError: Fashion-MNIST is not installed (``apt-get install dataset-fashion-mnist``).
    """
    folder = Path(cache) / f"{SCENES}-v{SCENES_VERSION}-{count}-{seed}"
    if folder.is_dir():
        return folder
    started = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SCENES}-", dir=folder.parent))
    try:
        write_scenes(tmp, count, seed)
        try:
            tmp.rename(folder)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "%d Fashion-MNIST scenes -> %s in %.1f s", count, folder, time.perf_counter() - started
    )
    return folder
