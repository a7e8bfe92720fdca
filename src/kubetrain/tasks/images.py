"""Images: sharded image datasets streamed from disk or object storage, through every step.

Preprocess (``build``) lists the source (an image folder, a CSV/Parquet manifest, tar shards,
a sharded dataset that already exists, or the built-in ``fashion-mnist``), writes the shards
with ``kubetrain.data.images.build_image_dataset`` and then ``meta.json``; fanned out over
tasks (``plan``, ``convert``, ``merge``: ``kubetrain.data.fanout``) it writes the same. The meta: the classes, the
model's input shape after the eval transforms, split sizes and class counts, the shard
manifest's content version, and the training split's per-channel mean and std (the default
``Normalize``). A source that already is a sharded dataset is not copied: ``meta.root`` points
at it, and training streams straight from there (``s3://`` included).

Training streams each rank's share of the shards (``kubetrain.data.streaming``) through
``data.num_workers`` DataLoader workers that decode and augment (``kubetrain.data.transforms``);
validation streams the val split split across ranks and sums over them. Quantize and evaluate
decode seeded subsets (``examples``) or whole splits (``score``) with the eval transforms.

Needs torchvision (the ``vision`` extra): without it the image kind stops in one line.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from kubetrain.core.errors import ConfigError, DataError
from kubetrain.core.io import atomic_directory
from kubetrain.core.records import DatasetPart, ImageMeta, PreprocessPlan, SlotResult
from kubetrain.data.images import STATS_IMAGES
from kubetrain.tasks.base import Batch, BatchPlan, Scores, Task
from kubetrain.tasks.stream import StreamBatches

if TYPE_CHECKING:
    from kubetrain.core.artifacts import DatasetArtifact
    from kubetrain.core.distributed import DistContext
    from kubetrain.data.config import DataConfig
    from kubetrain.data.shards import ShardManifest
    from kubetrain.tasks.config import TaskConfig

log = logging.getLogger(__name__)

FASHION_MNIST = "fashion-mnist"
BUILTIN_SOURCES = (FASHION_MNIST,)
VISION_HINT = (
    "image datasets need torchvision: use the vision extra (`make venv-vision`, or "
    "pip install 'kubetrain[vision]')"
)
EVAL_BATCH = 256
MAX_EXAMPLES = 32  # misclassified test images shown in the report


def require_torchvision(where: str = "data.source") -> None:
    """Raise the one-line ConfigError that says how to get torchvision, if it is missing."""
    try:
        import torchvision  # noqa: F401
    except ImportError as err:  # also the wheel that does not import beside this torch
        raise ConfigError(f"config error: {where}: {VISION_HINT} ({err})") from None


# -- which sources are images ------------------------------------------------------------------
# A brace pattern of tar shards ({000000..000127} or {a,b}); not a {date} placeholder.
_BRACE_RANGE = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


def is_image_source(cfg: DataConfig) -> bool:
    """Whether ``cfg.source`` names images (read from names and at most one header or listing).

    Images: a built-in image set (``fashion-mnist``), tar shards or a brace pattern, a CSV or
    Parquet manifest whose header has ``data.image_column``, a sharded dataset (``shards.json``
    inside) or any other directory (an image-folder tree).
    """
    from kubetrain.data.image_sources import MANIFEST_SUFFIXES, TAR_SUFFIXES, filesystem

    source = cfg.source.strip()
    if source in BUILTIN_SOURCES:
        return True
    name = source.rstrip("/").lower()
    if _BRACE_RANGE.search(source) or name.endswith(TAR_SUFFIXES):
        return True
    if any(c in source for c in "*?["):  # a glob of tabular files
        return False
    if name.endswith(MANIFEST_SUFFIXES):
        return cfg.image_column in _header(source, cfg.storage_options)
    if "." in posixpath.basename(name) and name.endswith((".npz", ".npy", ".json")):
        return False
    if source in ("digits", ""):
        return False
    try:
        fs, path = filesystem(source, cfg.storage_options)
        return bool(fs.isdir(path)) and _folder_of_images(fs, path)
    except (OSError, ValueError, ImportError):
        return False  # the tabular reader names the problem


def _folder_of_images(fs, path: str) -> bool:
    """A directory holds images if it has image files (or a shard manifest), or class
    subfolders and no tabular files (.csv/.parquet/.npz), looking at its top level and its first subfolder only (two listings, whatever the
    size of the tree): a sharded dataset and an image-folder tree are images, a folder of
    CSV or Parquet parts is a table."""
    from kubetrain.data.image_sources import IMAGE_SUFFIXES
    from kubetrain.data.shards import MANIFEST
    from kubetrain.data.sources import SUFFIXES as TABLE_SUFFIXES

    entries = fs.ls(path, detail=True)
    names = [str(e["name"]).lower() for e in entries if e.get("type") != "directory"]
    folders = sorted(str(e["name"]) for e in entries if e.get("type") == "directory")
    if folders:
        inside = fs.ls(folders[0], detail=True)
        names += [str(e["name"]).lower() for e in inside if e.get("type") != "directory"]
    if any(n.endswith(MANIFEST) or n.endswith(IMAGE_SUFFIXES) for n in names):
        return True
    # Neither images nor tables: subfolders make it an image-folder tree (whose empty class
    # folder the image reader names); a flat folder of neither is the tabular reader's "no data".
    return bool(folders) and not any(n.endswith(TABLE_SUFFIXES) for n in names)


def _header(source: str, storage_options: Mapping[str, Any]) -> list[str]:
    """Column names of a CSV/Parquet file ([] if it cannot be read: the readers say why)."""
    from kubetrain.data.image_sources import filesystem

    try:
        fs, path = filesystem(source, storage_options)
        if source.lower().endswith(".csv"):
            with fs.open(path, "rt") as f:
                return [c.strip().strip('"') for c in f.readline().rstrip("\r\n").split(",")]
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            return list(pq.read_schema(f).names)
    except (OSError, ValueError, ImportError):
        return []


def _is_shard_dataset(source: str, storage_options: Mapping[str, Any]) -> bool:
    from kubetrain.data.image_sources import filesystem
    from kubetrain.data.shards import MANIFEST

    try:
        fs, path = filesystem(source, storage_options)
        return bool(fs.isfile(posixpath.join(path.rstrip("/"), MANIFEST)))
    except (OSError, ValueError, ImportError):
        return False


# -- preprocess ------------------------------------------------------------------------------
def preflight(cfg: DataConfig) -> None:
    """What ``kubetrain run`` checks before anything is written: torchvision imports, the
    source exists, the transforms build.

    Raises:
        ConfigError: no torchvision, or a transform that does not build.
        DataError: the source does not exist.
    """
    require_torchvision()
    data = cfg
    if data.source in BUILTIN_SOURCES:
        from kubetrain.data.idx import fashion_mnist_files

        fashion_mnist_files("train")
    elif "{" not in data.source:
        from kubetrain.data.image_sources import filesystem

        fs, path = filesystem(data.source, data.storage_options)
        if not fs.exists(path):
            raise DataError(f"data error: {data.source}: not found")
    transforms(data, 2, "RGB" if data.image_mode == "RGB" else "L", [0.5], [0.5])


def build(cfg: DataConfig, out_dir: str | Path) -> ImageMeta:
    """Preprocess: the image dataset of ``cfg`` as shards in ``out_dir`` (or, for a source that
    already is a sharded dataset, a reference to it), then ``meta.json``.

    Args:
        cfg: the ``data`` section.
        out_dir: the dataset artifact's directory.

    Returns:
        The meta (``ImageMeta``): the shard manifest's content version, the model's input
        shape after the eval transforms, the training split's per-channel mean and std, the
        class counts per split, ``root`` when the shards are not in ``out_dir``, ``notes`` (a
        line saying how many images were skipped and why, if any were).

    Raises:
        ConfigError: no torchvision; transforms that do not build.
        DataError: the source is missing or malformed, nothing decodes, or the images differ in
            size and neither ``data.image_size`` nor the eval transforms give one size.
    """
    from kubetrain.core.artifacts import DATASET_META
    from kubetrain.data.images import build_image_dataset
    from kubetrain.data.shards import read_manifest

    require_torchvision()
    _check_transforms(cfg)
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / DATASET_META).unlink(missing_ok=True)  # a failed rebuild leaves no complete marker
    root: str | None = None
    if _is_sharded(cfg):
        root = cfg.source.rstrip("/")
        manifest = read_manifest(root, cfg.storage_options)
        if manifest.meta.get("kind") != "images":
            raise DataError(f"data error: {cfg.source}: a sharded dataset, but not of images")
        log.info("%s: a sharded image dataset; training streams from it", root)
    else:
        manifest = build_image_dataset(_listed(cfg), str(out))
    return _write_meta(cfg, manifest, out, root, time.perf_counter() - started)


def _check_transforms(cfg: DataConfig) -> None:
    """The transforms first, on a blank image with stand-in statistics: a wrong name or value
    is one line before any shard is written (the real ones come from the training split)."""
    channels = len(cfg.image_mode)
    transforms(cfg, 2, cfg.image_mode, [0.5] * channels, [0.25] * channels)


def _is_sharded(cfg: DataConfig) -> bool:
    """The source already is a sharded image dataset: training streams from it as it is."""
    return cfg.source not in BUILTIN_SOURCES and _is_shard_dataset(cfg.source, cfg.storage_options)


def _listed(cfg: DataConfig) -> DataConfig:
    """``cfg`` with a built-in image set's source replaced by the folder it is converted to."""
    if cfg.source in BUILTIN_SOURCES:
        return cfg.model_copy(update={"source": str(fashion_mnist_folder(cfg.limit))})
    return cfg


def _write_meta(
    cfg: DataConfig,
    manifest: ShardManifest,
    out: Path,
    root: str | None,
    seconds: float,
    tasks: int = 1,
) -> ImageMeta:
    """``meta.json`` of the image dataset whose manifest is ``manifest`` (at ``root``, or in
    ``out``), written last: it marks the artifact complete; its notes say what was skipped."""
    from kubetrain.core.artifacts import DatasetArtifact
    from kubetrain.data.images import skipped_note

    options = dict(cfg.storage_options)
    mode = manifest.meta["image_mode"]
    classes = list(manifest.meta["classes"])
    mean, std = image_stats(root or str(out), manifest, options)
    shape = model_input_shape(cfg, manifest.meta.get("input_shape"), len(classes), mode, mean, std)
    meta = ImageMeta(
        version=manifest.version,
        source=cfg.source,
        classes=classes,
        input_shape=shape,
        stored_shape=manifest.meta.get("input_shape"),
        image_mode=mode,
        mean=mean,
        std=std,
        sizes={s: manifest.num_samples(s) for s in ("train", "val", "test")},
        class_counts={
            split: {classes[int(k)]: v for k, v in counts.items()}
            for split, counts in manifest.class_counts.items()
        },
        num_skipped=manifest.provenance.get("num_skipped", 0),
        notes=[n for n in [skipped_note(manifest.provenance)] if n],
        config=cfg.model_dump(mode="json"),
        preprocess_seconds=round(seconds, 3),
        preprocess_tasks=tasks,
        root=root,
    )
    DatasetArtifact.write_meta(out, meta)  # last: marks the artifact complete
    return meta


# -- preprocess fanned out over tasks: plan, convert, merge (kubetrain.data.fanout) --------------
def plan(cfg: DataConfig, plan_dir: Path, num_tasks: int) -> PreprocessPlan:
    """The plan task: list the source, split it and fix the shards (``plan_dir`` gets the
    listing; the caller writes the record). A source that already is a sharded dataset has
    nothing to convert: its plan is ``whole`` and merge only reads it.

    Raises:
        ConfigError, DataError: as ``build``.
    """
    from kubetrain.data.fanout import whole_plan
    from kubetrain.data.images import plan_image_shards

    require_torchvision()
    _check_transforms(cfg)  # before any convert task starts
    if _is_sharded(cfg):
        return whole_plan("images", cfg.source, num_tasks)
    planned = plan_image_shards(_listed(cfg), num_tasks)
    planned.save(plan_dir)
    return planned.record.model_copy(update={"source": cfg.source})


def convert(
    cfg: DataConfig, plan_dir: Path, planned: PreprocessPlan, task: int, root: str
) -> DatasetPart:
    """A convert task: decode, convert and write its range of shards into ``root``.

    Raises:
        DataError: the store fails, or the plan is unreadable.
    """
    from kubetrain.data.fanout import convert_part
    from kubetrain.data.images import ImagePlan, convert_image_shards

    def run(slots: list[int]) -> list[SlotResult]:
        listed = _listed(cfg)  # a built-in set: converted once per machine, like the plan's
        return convert_image_shards(listed, ImagePlan.load(plan_dir, planned), slots, root)

    return convert_part(planned, task, max(1, cfg.num_workers), run)


def merge(
    cfg: DataConfig,
    plan_dir: Path,
    planned: PreprocessPlan,
    results: list[SlotResult],
    parts: list[DatasetPart],
    root: str,
    out: Path,
) -> ImageMeta:
    """The merge task: the manifest of the shards at ``root`` (every range checked complete by
    the caller), the training split's mean and std combined from the parts, ``meta.json``.

    Args:
        results: every slot's result, in slot order.
        parts: the convert tasks' parts (their time goes into ``preprocess_seconds``).
        root: where the shards are (``out`` itself, or the shard store).
        out: the dataset artifact's directory.

    Raises:
        DataError: no image decodes, or none of a class's; ConfigError: the transforms.
    """
    from kubetrain.data.images import ImagePlan, merge_image_shards

    started = time.perf_counter()
    image_plan = ImagePlan.load(plan_dir, planned)
    manifest = merge_image_shards(_listed(cfg), image_plan, results, root)
    stored = None if root == str(out) else root
    seconds = planned.seconds + sum(p.seconds for p in parts) + time.perf_counter() - started
    return _write_meta(cfg, manifest, out, stored, seconds, tasks=planned.num_tasks)


def cache_dir() -> Path:
    """Where converted built-in data sets are kept: ``$KUBETRAIN_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/kubetrain`` or ``~/.cache/kubetrain``; a temporary folder when none of
    them can be written (a read-only container)."""
    for candidate in (
        os.environ.get("KUBETRAIN_CACHE_DIR"),
        os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kubetrain"
        ),
    ):
        if not candidate:
            continue
        try:
            Path(candidate).mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return Path(candidate)
        except OSError:
            continue
    return Path(tempfile.gettempdir()) / "kubetrain-cache"


def fashion_mnist_folder(limit: int | None = None) -> Path:
    """Debian's Fashion-MNIST (train + t10k IDX files) as an image folder, written once into
    ``cache_dir()`` (atomically: a folder that exists is complete) and reused.

    Args:
        limit: at most this many images in all, the same number of each of the 10 classes (the
            first ones in file order); None: all 70 000.

    Returns:
        The image-folder root (one subfolder per class, PNG files).

    Raises:
        DataError: the dataset is not installed (``apt-get install dataset-fashion-mnist``).
    """
    from kubetrain.data.idx import FASHION_MNIST_CLASSES, fashion_mnist_files, idx_to_image_folder

    files = [fashion_mnist_files(split) for split in ("train", "t10k")]
    per_class = None if limit is None else max(1, limit // len(FASHION_MNIST_CLASSES))
    folder = cache_dir() / f"fashion-mnist-{per_class or 'all'}"
    if folder.is_dir():
        return folder
    started = time.perf_counter()
    # Another process converting it at the same time: the first to finish wins, both use it.
    with atomic_directory(folder, replace=False) as tmp:
        written: dict[str, int] = {}
        for images, labels in files:
            left = None if per_class is None else per_class - min(written.values(), default=0)
            if left is not None and left <= 0:
                break
            part = idx_to_image_folder(
                images, labels, tmp / images.name.split("-")[0], FASHION_MNIST_CLASSES, left
            )
            for name, n in part.items():
                written[name] = written.get(name, 0) + n
        _merge_class_folders(tmp)
    log.info("Fashion-MNIST -> %s in %.1f s", folder, time.perf_counter() - started)
    return folder


def _merge_class_folders(root: Path) -> None:
    """``root/<split>/<class>/<n>.png`` -> ``root/<class>/<split>-<n>.png``."""
    for split_dir in [p for p in root.iterdir() if p.is_dir()]:
        for class_dir in split_dir.iterdir():
            target = root / class_dir.name
            target.mkdir(exist_ok=True)
            for f in class_dir.iterdir():
                f.rename(target / f"{split_dir.name}-{f.name}")
            class_dir.rmdir()
        split_dir.rmdir()


def image_stats(
    root: str, manifest: ShardManifest, options: Mapping[str, Any]
) -> tuple[list[float], list[float]]:
    """The training split's per-channel mean and std: from the pixel sums the build recorded
    in the manifest, or read from the shards (a sharded dataset made elsewhere)."""
    from kubetrain.core.records import PixelSums
    from kubetrain.data.images import mean_std

    recorded = manifest.provenance.get("pixel_sums")
    if recorded:
        return mean_std(PixelSums.parse(recorded, posixpath.join(root, "shards.json")))
    return channel_stats(root, manifest, options)


def channel_stats(
    root: str, manifest: ShardManifest, options: Mapping[str, Any], limit: int = STATS_IMAGES
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (pixel values scaled to 0..1) of the training split's first
    ``limit`` images in shard order (the shards are shuffled at write time: a fair sample),
    summed per shard and combined in shard order, as a build does."""
    from kubetrain.data.images import mean_std, pixel_sums
    from kubetrain.data.shards import read_shard

    mode = manifest.meta["image_mode"]
    total = None
    left = limit
    for shard in manifest.splits.get("train", []):
        if left <= 0:
            break
        part = pixel_sums(read_shard(root, shard, options)["image"][:left], mode)
        total = part if total is None else total.plus(part)
        left -= part.images
    if total is None or not total.pixels:
        raise DataError(f"data error: {root}: the training split has no images")
    return mean_std(total)


def model_input_shape(
    cfg: DataConfig,
    stored: list[int] | None,
    num_classes: int,
    mode: str,
    mean: list[float],
    std: list[float],
) -> list[int]:
    """The shape the model sees: the eval transforms' output for stored images.

    Raises:
        DataError: the stored images differ in size and the eval transforms do not make them
            one size.
    """
    channels = len(mode)
    sizes = [tuple(stored[1:])] if stored else [(32, 32), (37, 53)]
    _, evaluate, _ = transforms(cfg, num_classes, mode, mean, std)
    shapes = {tuple(evaluate.blank(h, w).shape) for h, w in sizes}
    if len(shapes) > 1:
        raise DataError(
            f"data error: {cfg.source}: the images differ in size; set data.image_size (resize "
            "when the shards are written) or end data.transforms.eval (and .train) with one "
            "size (e.g. Resize + CenterCrop)"
        )
    shape = list(shapes.pop())
    if shape[0] != channels:
        raise ConfigError(
            f"config error: data.transforms.eval: gives {shape[0]} channels for {mode} images"
        )
    return shape


# -- transforms --------------------------------------------------------------------------------
def _with_normalize(specs: list[Any], mean: list[float], std: list[float]) -> list[dict]:
    """``specs`` as plain dicts, with ``Normalize(mean, std)`` appended unless one is there."""
    plain = [s.model_dump() if hasattr(s, "model_dump") else dict(s) for s in specs]
    if not any(s.get("name") == "Normalize" for s in plain):
        plain.append({"name": "Normalize", "kwargs": {"mean": list(mean), "std": list(std)}})
    return plain


def transforms(
    cfg: DataConfig,
    num_classes: int,
    mode: str,
    mean: list[float],
    std: list[float],
    check: bool = True,
):
    """The train and eval per-sample transforms and the train collate (MixUp/CutMix).

    Each list gets ``Normalize(mean, std)`` (the training split's statistics) at its end
    unless it has its own; ``ToDtype(float32, scale=True)`` goes before it (see
    ``kubetrain.data.transforms.build_pipeline``).

    Raises:
        ConfigError: a transform's name or arguments are wrong (naming its place).
    """
    from kubetrain.data.transforms import BatchCollate, batch_specs, check_transforms

    require_torchvision("data.transforms")
    train = _ShapedTransform(
        _with_normalize(cfg.transforms.train, mean, std), mode, "data.transforms.train"
    )
    evaluate = _ShapedTransform(
        _with_normalize(cfg.transforms.eval, mean, std), mode, "data.transforms.eval"
    )
    collate = BatchCollate(batch_specs(cfg), num_classes)
    if check:
        check_transforms(train.inner, evaluate.inner, collate)
    return train, evaluate, collate


class _ShapedTransform:
    """An ``ImageTransform`` that can also say what it makes of a blank image of a size."""

    def __init__(self, specs: list[dict], mode: str, where: str) -> None:
        from kubetrain.data.transforms import ImageTransform

        self.inner = ImageTransform(specs, mode, where)
        self.mode, self.where = mode, where

    def __call__(self, record: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
        return self.inner(record)

    def blank(self, height: int, width: int) -> torch.Tensor:
        from PIL import Image

        from kubetrain.data.transforms import entry_error

        buf = io.BytesIO()
        Image.new(self.mode, (width, height)).save(buf, format="PNG")
        record = {"image": buf.getvalue(), "label": 0}
        try:
            return self.inner(record)[0]
        except ConfigError:
            raise
        except (TypeError, ValueError, RuntimeError) as err:
            raise entry_error(self.inner, record, err) from None


# -- the task ------------------------------------------------------------------------------
class ImageTask(Task):
    """Images streamed from shards: decoding and augmentation in DataLoader workers,
    MixUp/CutMix on batches, ``channels_last`` on CUDA."""

    kind = "images"

    def __init__(self, cfg: TaskConfig, data: DatasetArtifact) -> None:
        require_torchvision()
        super().__init__(cfg, data)
        meta = data.meta_of(ImageMeta)
        self.mode = meta.image_mode
        self.options = dict(cfg.data.storage_options)
        self.train_transform, self.eval_transform, self.collate = transforms(
            cfg.data, data.num_classes, self.mode, meta.mean, meta.std
        )
        # The model's input: what the (possibly tuned) eval transforms make of a stored image.
        stored = meta.stored_shape or meta.input_shape
        shape = list(self.eval_transform.blank(stored[1], stored[2]).shape)
        if shape != list(meta.input_shape):
            meta = meta.model_copy(update={"input_shape": shape})
            self.data = type(data)(path=data.path, meta=meta, arrays=data.arrays)
        self._manifest: ShardManifest | None = None

    @property
    def manifest(self) -> ShardManifest:
        if self._manifest is None:
            from kubetrain.data.shards import read_manifest

            self._manifest = read_manifest(self.data.root, self.options)
        return self._manifest

    def _stream(self, split: str, batch: int, transform, **kwargs: Any):
        from kubetrain.data.streaming import StreamingDataset

        return StreamingDataset(
            self.data.root, split, batch, transform=transform, storage_options=self.options,
            manifest=self.manifest, **kwargs,
        )  # fmt: skip

    # -- the model ---------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, device: torch.device) -> nn.Module:
        """On CUDA in ``channels_last`` (cuDNN's fast layout for convolutions); on the CPU as
        it is (measured: no gain for the small networks trained there, README "Vision")."""
        if device.type == "cuda":
            # Module.to takes memory_format (torch documents it); its type stubs omit it.
            return model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        return model.to(device)

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        if device.type == "cpu":
            return batch
        (x, *rest), target = batch
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        moved = tuple(t.to(device, non_blocking=True) for t in rest)
        return (x, *moved), target.to(device, non_blocking=True)

    # -- training ----------------------------------------------------------------------------
    def train_batches(self, tc: BatchPlan, ctx: DistContext) -> StreamBatches:
        accum = tc.grad_accum_steps
        micro = tc.batch_size // (ctx.world_size * accum)
        if micro < 1:
            raise ConfigError(
                f"config error: train.batch_size {tc.batch_size} is less than one sample per "
                f"process and accumulation step ({ctx.world_size} x {accum})"
            )
        dataset = self._stream(
            "train", micro, self.train_transform, rank=ctx.rank, world_size=ctx.world_size,
            num_workers=self.cfg.data.num_workers, seed=tc.seed, collate=self.collate,
        )  # fmt: skip
        return StreamBatches(dataset, accum, self.cfg.data.num_workers, self.cfg.data.prefetch)

    def validate(self, model: nn.Module, ctx: DistContext) -> tuple[float, float]:
        """The val split streamed in ``world_size`` disjoint parts (no shuffling); loss sum,
        correct and count summed over ranks (every rank calls this)."""
        import torch.nn.functional as F

        from kubetrain.core.distributed import all_reduce_sum

        stream = self._stream(
            "val", EVAL_BATCH, self.eval_transform, rank=ctx.rank, world_size=ctx.world_size,
            shuffle=False,
        )  # fmt: skip
        loss_sum, correct, count = 0.0, 0.0, 0.0
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            for x, y in stream:
                (xb,), yb = self.to_device(((x,), y), ctx.device)
                logits = model(xb).float()
                loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
                correct += int((logits.argmax(1) == yb).sum())
                count += len(yb)
        model.train(was_training)
        loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], ctx)
        if not count:
            raise DataError(f"data error: {self.data.root}: the val split has no images")
        return loss_sum / count, correct / count

    # -- quantize and evaluate ---------------------------------------------------------------
    def _records(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(position, record)`` of ``split`` in manifest order, one shard in memory."""
        from kubetrain.data.shards import read_shard

        position = 0
        for shard in self.manifest.splits.get(split, []):
            columns = read_shard(self.data.root, shard, self.options)
            for i in range(shard.num_samples):
                yield position, {k: v[i] for k, v in columns.items()}
                position += 1

    def examples(self, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``n`` images of ``split`` drawn at random (seeded), eval-transformed; only the
        shards that hold them are read."""
        import bisect

        from kubetrain.data.shards import read_shard

        shards = self.manifest.splits.get(split, [])
        starts = list(np.cumsum([0] + [s.num_samples for s in shards]))
        total = int(starts[-1])
        if total == 0:
            raise DataError(f"data error: {self.data.root}: the {split} split has no images")
        chosen = np.random.default_rng(seed).permutation(total)[: min(n, total)]
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for k, position in enumerate(chosen.tolist()):
            j = bisect.bisect_right(starts, position) - 1
            by_shard.setdefault(j, []).append((position - int(starts[j]), k))
        xs: list[torch.Tensor | None] = [None] * len(chosen)
        ys = torch.empty(len(chosen), dtype=torch.long)
        for j, rows in sorted(by_shard.items()):
            columns = read_shard(self.data.root, shards[j], self.options)
            for row, k in rows:
                xs[k], ys[k] = self.eval_transform({c: v[row] for c, v in columns.items()})
        return torch.stack(xs), ys  # type: ignore[arg-type]

    def score(self, model: nn.Module, split: str) -> Scores:
        """Accuracy, top-5 (with at least 5 classes), per-class accuracy and confusion matrix
        on the whole of ``split``, with up to 32 misclassified images (PNG data URIs).
        ``seconds`` is forward time only (decoding excluded), so images/s compares models."""
        from kubetrain.tasks import measure

        classes = self.data.classes
        k = min(5, len(classes))
        truth, predicted, top5_hits = [], [], 0
        wrong: list[dict[str, Any]] = []
        seconds = 0.0
        records: list[dict[str, Any]] = []

        def run(batch: list[dict[str, Any]]) -> None:
            nonlocal seconds, top5_hits
            pairs = [self.eval_transform(r) for r in batch]
            x = torch.stack([p[0] for p in pairs])
            y = torch.tensor([p[1] for p in pairs])
            started = time.perf_counter()
            with torch.no_grad():  # not inference_mode: inductor freezing fails under it
                logits = model(x)
            seconds += time.perf_counter() - started
            best = logits.topk(k, dim=1).indices
            pred = best[:, 0]
            top5_hits += int((best == y[:, None]).any(1).sum())
            truth.append(y.numpy())
            predicted.append(pred.numpy())
            for r, t, p in zip(batch, y.tolist(), pred.tolist(), strict=True):
                if t != p and len(wrong) < MAX_EXAMPLES:
                    wrong.append(
                        {"true": classes[t], "predicted": classes[p], "image": png_uri(r["image"])}
                    )

        for _, record in self._records(split):
            records.append(record)
            if len(records) == EVAL_BATCH:
                run(records)
                records = []
        if records:
            run(records)
        if not truth:
            raise DataError(f"data error: {self.data.root}: the {split} split has no images")
        y_true, y_pred = np.concatenate(truth), np.concatenate(predicted)
        values = measure.classification(y_true, y_pred, classes)
        if len(classes) >= 5:
            values["top5_accuracy"] = top5_hits / len(y_true)
        return Scores("accuracy", values, wrong, samples=len(y_true), seconds=seconds)


def png_uri(data: bytes) -> str:
    """An encoded image (JPEG, PNG, ...) as a ``data:image/png;base64,...`` URI."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        img.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")
