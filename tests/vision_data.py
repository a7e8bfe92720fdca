"""Image sets the vision tests write themselves: Pillow-rendered shapes with the class digit,
32-64 px, in every format and colour mode a source may hold, plus a few broken files."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

# (extension, Pillow mode, save format): cycled over the images of each class.
VARIANTS = (
    (".png", "RGB", "PNG"),
    (".JPG", "RGB", "JPEG"),
    (".png", "L", "PNG"),
    (".png", "RGBA", "PNG"),
    (".png", "I;16", "PNG"),
    (".png", "P", "PNG"),
    (".jpeg", "L", "JPEG"),
    (".webp", "RGB", "WEBP"),
    (".bmp", "RGB", "BMP"),
)
# Broken files that still carry an image suffix: counted as skipped, never fatal.
CORRUPT = {
    "truncated.jpg": lambda good: good[: len(good) // 2],
    "garbage.png": lambda good: b"this is not an image at all" * 4,
    "empty.jpeg": lambda good: b"",
}


def render(label: int, index: int, mode: str = "RGB"):
    """One image of class ``label``: a shape (one per class) and the digit, size 32-64 px."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([label, index])
    size = int(rng.integers(32, 65))
    background = tuple(int(v) for v in rng.integers(0, 80, 3))
    color = tuple(int(v) for v in rng.integers(150, 256, 3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    m = int(rng.integers(2, size // 4))
    box = [m, m, size - m, size - m]
    match label % 5:
        case 0:
            draw.ellipse(box, fill=color)
        case 1:
            draw.rectangle(box, fill=color)
        case 2:
            draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=color)
        case 3:
            draw.line([(m, m), (size - m, size - m)], fill=color, width=max(2, size // 8))
        case 4:
            draw.ellipse(box, outline=color, width=max(2, size // 10))
    draw.text((size // 3, size // 3), str(label), fill=(255, 255, 255))
    if mode == "I;16":
        return Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    if mode == "P":
        return img.quantize(16)
    return img.convert(mode)


def encode(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def image_folder(
    root: Path, classes: int = 10, per_class: int = 20, corrupt: bool = True, start: int = 0
) -> dict:
    """An image-folder tree ``root/class_<k>/<i><ext>`` in mixed formats and modes, with the
    broken files of ``CORRUPT`` in class 0 when ``corrupt``. Returns counts: images per class
    (``good``) and broken files (``corrupt``)."""
    root = Path(root)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            ext, mode, fmt = VARIANTS[(i + label) % len(VARIANTS)]
            (folder / f"{i:04d}{ext}").write_bytes(encode(render(label, i, mode), fmt))
    (root / "README.txt").write_text("files beside the class folders are not samples")
    (root / "class_1" / "notes.txt").write_text("not an image")
    if corrupt:
        good = encode(render(0, 999), "JPEG")
        for name, breaker in CORRUPT.items():
            (root / "class_0" / name).write_bytes(breaker(good))
    return {"good": classes * per_class, "corrupt": len(CORRUPT) if corrupt else 0}


def tar_shards(root: Path, classes: int = 10, per_class: int = 12, num_shards: int = 3) -> list:
    """WebDataset-style tars ``root/train-{000000..}.tar``: ``<key>.png`` + ``<key>.cls``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    samples = [(label, i) for i in range(per_class) for label in range(classes)]
    paths = []
    for s in range(num_shards):
        path = root / f"train-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for label, i in samples[s::num_shards]:
                ext, mode, fmt = VARIANTS[(i + label) % len(VARIANTS)]
                key = f"sample{label:02d}{i:04d}"
                for name, data in (
                    (f"{key}{ext.lower()}", encode(render(label, i, mode), fmt)),
                    (f"{key}.cls", str(label).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
