"""Box-annotated image sets the detection tests write themselves: Pillow-rendered shapes (one
shape per class) on a noisy background, with exact boxes, written as COCO, Pascal VOC or YOLO
folders; the same scenes in each format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHAPES = ("square", "disc", "triangle")  # class k draws SHAPES[k]


def scene(index: int, size: tuple[int, int] = (64, 80), empty: bool = False):
    """One image and its objects: ``(PIL image, [(class, (x1, y1, x2, y2))])``; 1-3 shapes
    of 14-26 px, not overlapping, or none with ``empty``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([7, index])
    h, w = size
    pixels = rng.integers(0, 40, (h, w, 3)).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    objects: list[tuple[int, tuple[int, int, int, int]]] = []
    for _ in range(0 if empty else int(rng.integers(1, 4))):
        side = int(rng.integers(14, 27))
        for _attempt in range(20):
            x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            box = (x, y, x + side, y + side)
            if all(box[0] >= b[2] or box[2] <= b[0] or box[1] >= b[3] or box[3] <= b[1]
                   for _, b in objects):  # fmt: skip
                break
        else:
            continue
        cls = int(rng.integers(len(SHAPES)))
        colour = tuple(int(v) for v in rng.integers(150, 256, 3))
        if SHAPES[cls] == "square":
            draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=colour)
        elif SHAPES[cls] == "disc":
            draw.ellipse([box[0], box[1], box[2] - 1, box[3] - 1], fill=colour)
        else:
            draw.polygon([(box[0], box[3] - 1), (box[2] - 1, box[3] - 1),
                          ((box[0] + box[2]) // 2, box[1])], fill=colour)  # fmt: skip
        objects.append((cls, box))
    return img, objects


def scenes(count: int, empty_every: int = 10) -> list[tuple]:
    return [scene(i, empty=empty_every > 0 and i % empty_every == empty_every - 1)
            for i in range(count)]  # fmt: skip


def coco_folder(root: Path, count: int = 30, category_ids=(1, 3, 7), split: str = "train",
                extra_annotations=(), extra_images=()) -> dict:  # fmt: skip
    """``root/annotations/instances_<split>.json`` + ``root/images/<split>/*.png``; category
    ids ``category_ids`` (gaps allowed) for the shape classes. Returns the COCO dict."""
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": c, "name": SHAPES[k]} for k, c in enumerate(category_ids)]}  # fmt: skip
    for i, (img, objects) in enumerate(scenes(count)):
        name = f"{i:04d}.png"
        img.save(folder / name)
        image_id = 100 + i  # not the list position: ids are the source's own
        coco["images"].append({"id": image_id, "file_name": name, "width": img.width,
                               "height": img.height})  # fmt: skip
        for cls, (x1, y1, x2, y2) in objects:
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id,
                "category_id": category_ids[cls], "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
            })  # fmt: skip
    coco["images"] += list(extra_images)
    for ann in extra_annotations:
        coco["annotations"].append({"id": len(coco["annotations"]) + 1, "iscrowd": 0, **ann})
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return coco


def voc_folder(root: Path, count: int = 30) -> None:
    """``Annotations/*.xml`` (1-based corners) + ``JPEGImages/*.png``."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    for i, (img, objects) in enumerate(scenes(count)):
        name = f"{i:04d}.png"
        img.save(root / "JPEGImages" / name)
        objs = "".join(
            f"<object><name>{SHAPES[c]}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}"
            f"</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for c, (x1, y1, x2, y2) in objects
        )
        xml = (f"<annotation><filename>{name}</filename><size><width>{img.width}</width>"
               f"<height>{img.height}</height><depth>3</depth></size>{objs}</annotation>")  # fmt: skip
        (root / "Annotations" / f"{i:04d}.xml").write_text(xml)


def yolo_folder(root: Path, count: int = 30, names_as: str = "yaml") -> None:
    """``images/train/*.png`` + ``labels/train/*.txt`` (class cx cy w h, normalised), class
    names in ``data.yaml`` (a dict, as Ultralytics writes it) or ``classes.txt``; empty images
    have no label file."""
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    if names_as == "yaml":
        lines = "\n".join(f"  {k}: {n}" for k, n in enumerate(SHAPES))
        (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nnames:\n{lines}\n")
    else:
        (root / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    for i, (img, objects) in enumerate(scenes(count)):
        img.save(root / "images" / "train" / f"{i:04d}.png")
        if not objects:
            continue
        w, h = img.width, img.height
        lines = [
            f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
            f"{(y2 - y1) / h:.6f}"
            for c, (x1, y1, x2, y2) in objects
        ]
        (root / "labels" / "train" / f"{i:04d}.txt").write_text("\n".join(lines) + "\n")
