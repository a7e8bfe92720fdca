"""What the vision benchmarks share: a generated image folder, the sharded dataset built from it
with kubetrain's preprocess, the transforms both sides use, and the figures' formatting.

The image folder is rendered here (Pillow): ``classes`` folders of JPEGs whose sides are drawn
from ``[min_px, max_px]`` (not square, as photos are not), each a gradient background, a few
filled shapes and noise, so that JPEG sizes and decode times are those of textured pictures,
not of flat colour. It is cached under the system temp directory by its parameters.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import cpu_model, stats

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = Path(tempfile.gettempdir()) / "kubetrain-bench-vision"

# ImageNet's statistics, as users write them.
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def train_specs(size: int) -> list[dict[str, Any]]:
    """The training transforms both loaders apply (kubetrain's ``data.transforms.train``)."""
    return [
        {"name": "RandomResizedCrop", "kwargs": {"size": size, "antialias": True}},
        {"name": "RandomHorizontalFlip", "kwargs": {}},
        {"name": "ToDtype", "kwargs": {"dtype": "float32", "scale": True}},
        {"name": "Normalize", "kwargs": {"mean": MEAN, "std": STD}},
    ]


def user_transform(size: int):
    """The same transforms as users write them for ``torchvision.datasets.ImageFolder`` (the
    torchvision v2 getting-started form: PIL image -> ``ToImage`` first, then tensor ops)."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def _render(rng: np.random.Generator, label: int, min_px: int, max_px: int):
    from PIL import Image, ImageDraw

    w, h = (int(v) for v in rng.integers(min_px, max_px + 1, 2))
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, h)[:, None, None]
    pixels = top * (1 - ramp) + bottom * ramp + rng.normal(0, 12, (h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        x1, y1 = x0 + int(rng.integers(w // 4, w // 2)), y0 + int(rng.integers(h // 4, h // 2))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        if label % 2:
            draw.ellipse([x0, y0, x1, y1], fill=color)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=color)
    draw.text((w // 3, h // 3), str(label), fill=(255, 255, 255))
    return img


def image_folder(
    num_images: int = 3000, classes: int = 10, min_px: int = 64, max_px: int = 96
) -> Path:
    """A cached image folder ``<root>/class_<k>/<i>.jpg`` (quality 90), ``num_images`` split
    evenly over ``classes``.

    Returns:
        The folder's root.
    """
    root = CACHE / f"folder-{num_images}-{classes}-{min_px}-{max_px}"
    done = root / ".complete"
    if done.exists():
        return root
    jobs = [
        (
            root,
            label,
            num_images,
            num_images // classes + (label < num_images % classes),
            min_px,
            max_px,
        )
        for label in range(classes)
    ]
    # One process per class where there are cores (a GPU machine renders 10 000s of images).
    workers = min(classes, os.cpu_count() or 1)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render_class, jobs))
    else:
        for job in jobs:
            _render_class(job)
    done.touch()
    return root


def _render_class(job: tuple[Path, int, int, int, int, int]) -> None:
    root, label, num_images, count, min_px, max_px = job
    folder = root / f"class_{label}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([label, num_images])
    for i in range(count):
        _render(rng, label, min_px, max_px).save(folder / f"{i:05d}.jpg", quality=90)


def build_shards(folder: Path, out_dir: Path, num_workers: int = 2, **fields: Any) -> float:
    """kubetrain's preprocess of ``folder`` into shards at ``out_dir`` (rebuilt: no cache hit).

    Returns:
        Seconds it took.
    """
    import shutil

    from kubetrain.data.config import DataConfig
    from kubetrain.data.images import build_image_dataset

    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = DataConfig(source=str(folder), num_workers=num_workers, **fields)
    started = time.perf_counter()
    build_image_dataset(cfg, str(out_dir))
    return time.perf_counter() - started


def fmt(s: dict[str, float], digits: int = 0) -> str:
    """``median (min–max)``."""
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def ratios(a: list[float], b: list[float]) -> dict[str, float]:
    """Per-round ratios ``a[i] / b[i]`` (rounds ran side by side) as stats."""
    return stats([x / y for x, y in zip(a, b, strict=True)])


def machine() -> dict[str, Any]:
    import torch
    import torchvision

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load": os.getloadavg()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# -- kubetrain's training path on the images --------------------------------------------------
def dataset_artifact(folder: Path, out_dir: Path, size: int, num_workers: int = 2):
    """kubetrain's preprocess of ``folder`` (the ``images`` task's ``build``) into the
    dataset artifact ``out_dir``, with the benchmark's train and eval transforms.

    Returns:
        ``(data config, the loaded DatasetArtifact)``.

    Raises:
        KubetrainError: what the preprocess raises.
    """
    from kubetrain.core.artifacts import DatasetArtifact
    from kubetrain.pipeline.config import PipelineConfig
    from kubetrain.tasks import build_dataset

    data = PipelineConfig.model_validate(
        {"data": {"source": str(folder), "num_workers": num_workers,
                  "transforms": {"train": train_specs(size), "eval": eval_specs(size)}}}
    ).data  # fmt: skip
    if not (out_dir / "meta.json").exists():
        build_dataset(data, out_dir)
    return data, DatasetArtifact.load(out_dir)


def eval_specs(size: int) -> list[dict[str, Any]]:
    """Evaluation transforms (resize + centre crop + normalise)."""
    return [
        {"name": "Resize", "kwargs": {"size": size, "antialias": True}},
        {"name": "CenterCrop", "kwargs": {"size": size}},
        {"name": "Normalize", "kwargs": {"mean": MEAN, "std": STD}},
    ]
