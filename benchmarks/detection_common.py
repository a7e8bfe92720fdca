"""What the detection benchmarks share: a COCO folder of Fashion-MNIST scenes, kubetrain's
preprocess of it, the box transforms both sides apply."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

TMP = Path(tempfile.gettempdir()) / "kubetrain-bench-detection"


def coco_scenes(count: int, seed: int = 0) -> Path:
    """A COCO folder of ``count`` scenes (``kubetrain.data.scenes``), written once."""
    from kubetrain.data.scenes import scenes_folder

    TMP.mkdir(parents=True, exist_ok=True)
    return scenes_folder(TMP, count, seed)


def train_specs() -> list[dict[str, Any]]:
    """Training transforms that move boxes: flip, photometric jitter (then ToDtype and
    SanitizeBoundingBoxes, which kubetrain adds and the user's pipeline lists)."""
    return [
        {"name": "RandomHorizontalFlip", "kwargs": {"p": 0.5}},
        {"name": "RandomPhotometricDistort", "kwargs": {"p": 0.5}},
    ]


def user_transform():
    """The same transforms as a user writes them for ``CocoDetection`` (v2 guide order)."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomPhotometricDistort(p=0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.SanitizeBoundingBoxes(),
        ]
    )


def dataset_artifact(folder: Path, out_dir: Path, num_workers: int = 2, **data: Any):
    """kubetrain's preprocess of ``folder`` (the detection task's ``build``).

    Returns:
        ``(data config, the loaded DatasetArtifact)``.
    """
    from kubetrain.core.artifacts import DatasetArtifact
    from kubetrain.pipeline.config import PipelineConfig
    from kubetrain.tasks import build_dataset

    cfg = PipelineConfig.model_validate(
        {"data": {"source": str(folder), "task": "detection", "num_workers": num_workers,
                  "image_mode": "L", "transforms": {"train": train_specs()}, **data}}
    ).data  # fmt: skip
    if not (out_dir / "meta.json").exists():
        build_dataset(cfg, out_dir)
    return cfg, DatasetArtifact.load(out_dir)
