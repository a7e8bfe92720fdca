"""Write a COCO folder of drawn shapes: a detection source that is not the recipe's.

Discs, squares and triangles (COCO category ids 3, 7 and 12: the gaps are on purpose) of
12-56 px in random colours on a noisy 160 x 120 background, 0-4 a picture, some overlapping,
about one picture in twelve empty. The boxes are the shapes' exact extents. A few annotations
are wrong on purpose, as real exports are: a box reaching past the picture (clipped), one of
zero width (dropped), one with an unknown category (dropped).

    python examples/detection/shapes_coco.py /tmp/shapes --images 1200
    kubetrain run --config detection --set data.source=/tmp/shapes
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

CATEGORIES = [
    {"id": 3, "name": "disc"},
    {"id": 7, "name": "square"},
    {"id": 12, "name": "triangle"},
]
W, H = 160, 120


def _draw(draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, s: int, colour) -> list[float]:
    if kind == "disc":
        draw.ellipse([x, y, x + s - 1, y + s - 1], fill=colour)
    elif kind == "square":
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=colour)
    else:
        draw.polygon([(x, y + s - 1), (x + s - 1, y + s - 1), (x + (s - 1) / 2, y)], fill=colour)
    return [float(x), float(y), float(s), float(s)]  # COCO: x, y, width, height


def write(root: Path, images: int, seed: int) -> None:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    coco: dict = {"images": [], "annotations": [], "categories": CATEGORIES}
    for i in range(images):
        base = tuple(rng.randint(0, 90) for _ in range(3))
        noise = Image.frombytes("L", (W, H), rng.randbytes(W * H)).convert("RGB")
        img = Image.blend(noise, Image.new("RGB", (W, H), base), 0.8)
        draw = ImageDraw.Draw(img)
        count = 0 if rng.random() < 1 / 12 else rng.randint(1, 4)
        for _ in range(count):
            cat = rng.choice(CATEGORIES)
            s = rng.randint(12, 56)
            x, y = rng.randint(0, W - s), rng.randint(0, H - s)
            colour = tuple(rng.randint(120, 255) for _ in range(3))
            box = _draw(draw, cat["name"], x, y, s, colour)
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1,
                                        "category_id": cat["id"], "bbox": box,
                                        "area": box[2] * box[3], "iscrowd": 0})  # fmt: skip
        name = f"{i + 1:06d}.jpg"
        img.save(root / "images" / name, quality=92)
        coco["images"].append({"id": i + 1, "file_name": name, "width": W, "height": H})
    bad = [
        [W - 20.0, 10.0, 40.0, 30.0, 3],
        [30.0, 30.0, 0.0, 20.0, 7],
        [10.0, 10.0, 20.0, 20.0, 99],
    ]
    for k, (x, y, w, h, cat) in enumerate(bad):
        coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": k + 1,
                                    "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                                    "iscrowd": 0})  # fmt: skip
    (root / "annotations" / "instances_all.json").write_text(json.dumps(coco))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    write(args.root, args.images, args.seed)
    print(f"{args.root}: {args.images} images, annotations/instances_all.json")


if __name__ == "__main__":
    main()
