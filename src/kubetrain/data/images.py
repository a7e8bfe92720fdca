"""Image datasets: list a source, decode-check, split, convert and write shards, in parallel.

``build_image_dataset`` turns an image source (``kubetrain.data.image_sources``) into a sharded
dataset (``kubetrain.data.shards``): records ``{"image": <encoded bytes>, "label": <class id>}``
in ``train``/``val``/``test`` shards, and a manifest whose ``meta`` holds the class names, the
colour mode and the image shape, and whose ``provenance`` says where the data came from, what
was skipped and the input fingerprint.

Why it is laid out this way:

- The stratified split is drawn on the *listing* (labels are known before any pixel is read), so
  each output shard is a fixed list of images from the start: a worker process decodes, converts
  and writes one shard on its own, and memory per worker is one shard, whatever the dataset's
  size. An image that does not decode is dropped from its split and counted.
- Every image is converted to one colour mode (``data.image_mode``) and, with ``data.image_size``,
  one square size, so that batches stack and a model sees one input shape. A JPEG or PNG that
  needs no change is stored with its original bytes (no re-encoding loss, no time spent).
- Output is a function of the input bytes and the config: re-running on unchanged input writes
  the same shards and the same content version; a rebuild whose listing matches the fingerprint
  of the dataset already at ``out_dir`` is skipped altogether.
- The build is a plan (``plan_image_shards``: listing, split, every shard's images), a
  conversion of ranges of shards (``convert_image_shards``) and a merge (``merge_image_shards``:
  the manifest and the pixel sums of the default ``Normalize``), so a pipeline can run the
  conversion as many tasks (``kubetrain.data.fanout``); ``build_image_dataset`` runs all three
  in one process, and the shards are the same either way.

Only Pillow, numpy, pyarrow and fsspec are imported (no torch): worker processes start fast.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import posixpath
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kubetrain.core.errors import DataError
from kubetrain.core.records import PixelSums, PreprocessPlan, SlotResult
from kubetrain.data.config import DataConfig
from kubetrain.data.dataset import encode_labels, split_indices
from kubetrain.data.image_sources import ImageListing, ImageRef, filesystem, list_images, read_bytes
from kubetrain.data.shards import (
    MANIFEST,
    ShardInfo,
    ShardManifest,
    ShardWriter,
    read_manifest,
    save_manifest,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Bump when the way images are converted or stored changes: old shards are then rebuilt.
IMAGE_FORMAT = 1
KEPT_FORMATS = ("JPEG", "PNG")  # stored as they are when nothing needs changing
SKIPPED_SHOWN = 20  # skipped images named in the manifest's provenance
STATS_IMAGES = 10_000  # training images the default Normalize's mean/std are computed from
TOO_LARGE = "too large"  # the start of the reason of an image above data.max_image_pixels
MISSING = "missing"  # the reason of a manifest row whose file is gone


class ImageDecodeError(Exception):
    """One image cannot be used (corrupt, truncated, not an image)."""


def convert_image(
    data: bytes, mode: str = "RGB", size: int | None = None, max_pixels: int | None = None
) -> tuple[bytes, tuple]:
    """Decode ``data``, convert it to ``mode`` and (with ``size``) resize the shorter side to
    ``size`` and centre-crop a square; encode the result.

    Grayscale, palette (with or without transparency), RGBA/LA (composited on white), CMYK and
    16-bit images are all converted; EXIF orientation is applied. A JPEG or PNG that needs no
    change is returned as it is.

    Args:
        data: an encoded image (any format Pillow reads).
        mode: ``"RGB"`` or ``"L"``.
        size: the square side to resize to, or None to keep the size.
        max_pixels: refuse an image whose header declares more pixels than this, before a byte
            is decoded (a 17 KB PNG can declare 12 000 x 12 000: 8 GB decoded); None: no limit.

    Returns:
        ``(encoded bytes, (height, width))``: JPEG (quality 95) for JPEG input, PNG otherwise.

    Raises:
        ImageDecodeError: the bytes are not a complete image Pillow can decode, or it is larger
            than ``max_pixels``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # checked below, with a line naming the setting
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))  # reads the header only
        fmt = img.format
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImageDecodeError(
                f"{TOO_LARGE}: {img.width}x{img.height} = {img.width * img.height / 1e6:.1f} MP, "
                f"above data.max_image_pixels ({max_pixels / 1e6:.1f} MP)"
            )
        img.load()  # decodes everything: a truncated file fails here, not later in training
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image format Pillow knows") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(str(err) or type(err).__name__) from None
    except Image.DecompressionBombError as err:  # Pillow's own limit, above ours
        raise ImageDecodeError(f"{TOO_LARGE}: {err}") from None
    changed = False
    if img.getexif().get(0x0112, 1) != 1:
        img, changed = ImageOps.exif_transpose(img), True
    if img.mode != mode:
        img, changed = _to_mode(img, mode), True
    if size is not None and img.size != (size, size):
        img, changed = _resize_square(img, size), True
    if not changed and fmt in KEPT_FORMATS:
        return data, (img.height, img.width)
    out = io.BytesIO()
    if fmt == "JPEG":
        img.save(out, format="JPEG", quality=95)
    else:
        img.save(out, format="PNG")
    return out.getvalue(), (img.height, img.width)


def _to_mode(img, mode: str):
    from PIL import Image

    if img.mode.startswith("I"):
        # 16-bit (and 32-bit integer) grayscale: Pillow's convert would clip at 255; scale the
        # 16-bit range down instead.
        a = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert(mode)


def _resize_square(img, size: int):
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class _ShardTask:
    """One output shard: which images, in which order, with which class ids."""

    root: str
    split: str
    index: int
    refs: tuple[ImageRef, ...]
    labels: tuple[int, ...]
    mode: str
    size: int | None
    storage_options: Mapping[str, Any]
    max_pixels: int | None = None


@dataclass
class _ShardResult:
    task: _ShardTask
    shard: ShardInfo | None  # None: every image of the task was skipped
    class_counts: Counter
    skipped: list[tuple[str, str]]
    shapes: set[tuple[int, int]]


def _write_shard(task: _ShardTask) -> _ShardResult:
    """Decode, convert and write one shard (runs in a worker process)."""
    writer = ShardWriter(
        task.root,
        task.split,
        max_samples=len(task.refs) + 1,
        max_bytes=1 << 62,  # one task, one shard
        storage_options=task.storage_options,
        first_index=task.index,
    )
    counts: Counter = Counter()
    skipped: list[tuple[str, str]] = []
    shapes: set[tuple[int, int]] = set()
    for ref, label in zip(task.refs, task.labels, strict=True):
        try:
            data = read_bytes(ref, task.storage_options)
            image, shape = convert_image(data, task.mode, task.size, task.max_pixels)
        except FileNotFoundError:
            skipped.append((ref.name, MISSING))  # a manifest row whose file is gone
            continue
        except ImageDecodeError as err:
            skipped.append((ref.name, str(err)))
            continue
        except OSError as err:  # the store itself fails (permissions, network): not one image
            raise DataError(f"data error: {ref.name}: cannot read ({err})") from None
        writer.write({"image": image, "label": int(label)})
        counts[str(label)] += 1
        shapes.add(shape)
    writer.close()
    return _ShardResult(task, writer.shards[0] if writer.shards else None, counts, skipped, shapes)


def build_image_dataset(cfg: DataConfig, out_dir: str) -> ShardManifest:
    """Build the sharded image dataset that ``cfg`` describes at ``out_dir``.

    Lists ``cfg.source`` (an image folder, a CSV/Parquet manifest or tar shards), maps labels to
    class ids (sorted names), draws a stratified train/val/test split (seeded by ``cfg.seed``),
    then decodes, converts and writes the shards of every split with ``cfg.num_workers`` worker
    processes (0: in this process), and writes the manifest last. Images that do not decode
    are skipped and counted in a warning.

    Args:
        cfg: the ``data`` section (source, storage_options, image_column, label_column,
            image_mode, image_size, shard_samples, val/test fractions, seed, num_workers).
        out_dir: where the shards and ``shards.json`` go (a local path or fsspec URI; remote
            URIs use ``cfg.storage_options``).

    Returns:
        The manifest; ``meta`` has ``classes``, ``image_mode``, ``image_size`` and
        ``input_shape`` ([C, H, W], or None when sizes differ), ``provenance`` has ``source``,
        ``num_listed``, ``num_skipped``, ``skipped`` (the first few, with reasons) and
        ``fingerprint``.

    Raises:
        DataError: the source is missing or malformed, a class folder has no images, a class
            has too few images to split, or no image (or no image of a class) decodes.
        ConfigError: a malformed brace pattern in ``cfg.source``.
    """
    started = time.perf_counter()
    out_dir = str(out_dir)
    options = dict(cfg.storage_options)
    listing = _list(cfg, options)
    cached = _cached(out_dir, _fingerprint(listing.fingerprint, cfg), options)
    if cached is not None:
        log.info("%s: unchanged input, reusing dataset %s", out_dir, cached.version)
        return cached
    plan = plan_image_shards(cfg, 1, listing)
    _remove_manifest(out_dir, options)  # a failed build leaves no manifest naming old shards
    try:
        results = convert_image_shards(cfg, plan, range(len(plan.record.slots)), out_dir)
        manifest = merge_image_shards(cfg, plan, results, out_dir)
    except BaseException:
        # Half a dataset is no dataset (and on a full disk, what keeps it full): the shards
        # this build wrote go, and the temporary file a writer was in the middle of.
        _remove_shards(out_dir, [], options, temporary=True)
        raise
    _log_built(cfg, out_dir, manifest, len(listing.refs), len(plan.classes), started)
    return manifest


def _list(cfg: DataConfig, options: Mapping[str, Any]) -> ImageListing:
    """The images of ``cfg.source`` with their labels (listed with up to 2 threads a worker)."""
    return list_images(
        cfg.source,
        label_column=cfg.label_column,
        image_column=cfg.image_column,
        storage_options=options,
        num_threads=max(4, cfg.num_workers * 2),
    )


def _classes_and_splits(
    refs: list[ImageRef], cfg: DataConfig
) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """Class ids of the images (sorted names), the class names and the stratified split."""
    labels = np.array([ref.label for ref in refs])
    if labels.dtype.kind in "OUS":
        labels = _numeric_if_possible(labels)
    ids, classes = encode_labels(labels)
    if len(classes) < 2:
        raise DataError(f"data error: {cfg.source}: needs at least 2 classes, found {classes}")
    try:
        parts = split_indices(ids, cfg)
    except DataError as err:  # name the source: the split's message cannot
        raise DataError(str(err).replace("data error:", f"data error: {cfg.source}:", 1)) from None
    return ids, classes, parts


def skip_reason(why: str) -> str:
    """The kind of reason an image was skipped for: missing, too large, or does not decode."""
    if why == MISSING:
        return "missing"
    return "too large" if why.startswith(TOO_LARGE) else "do not decode"


def skipped_note(provenance: Mapping[str, Any]) -> str | None:
    """One line saying how many images were skipped and why (None: none was): what reaches
    the terminal and the report, whichever step reads it."""
    skipped = int(provenance.get("num_skipped") or 0)
    if not skipped:
        return None
    by_reason = provenance.get("skipped_by_reason") or {"do not decode": skipped}
    parts = ", ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items()))
    first = (provenance.get("skipped") or [[None, None]])[0]
    example = f" (e.g. {first[0]}: {first[1]})" if first[0] else ""
    listed = provenance.get("num_listed")
    of = f" of {listed}" if listed else ""
    return f"{provenance.get('source')}: skipped {skipped}{of} images: {parts}{example}"


def _log_built(
    cfg: DataConfig,
    out_dir: str,
    manifest: ShardManifest,
    num_listed: int,
    num_classes: int,
    started: float,
) -> None:
    """Log the images skipped (a warning, if any) and what was built in how long."""
    skipped = manifest.provenance["num_skipped"]
    note = skipped_note(manifest.provenance)
    if note:
        log.warning("%s", note)
    log.info(
        "%s: %d images, %d classes -> %s (version %s) in %.1f s",
        cfg.source,
        num_listed - skipped,
        num_classes,
        out_dir,
        manifest.version,
        time.perf_counter() - started,
    )


def _numeric_if_possible(labels: np.ndarray) -> np.ndarray:
    """Integer labels written as text (tar ``.cls`` members) sort as numbers, not strings."""
    try:
        return np.array([int(str(v)) for v in labels])
    except ValueError:
        return labels.astype(str)


def _fingerprint(listing: str, cfg: DataConfig) -> str:
    """The listing's digest and every setting that changes the shards: the cache key."""
    settings = {
        "format": IMAGE_FORMAT,
        "listing": listing,
        **cfg.model_dump(
            include={
                "image_mode", "image_size", "max_image_pixels", "shard_samples", "seed",
                "val_fraction", "test_fraction", "label_column", "image_column",
            }
        ),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _cached(out_dir: str, fingerprint: str, options: Mapping[str, Any]) -> ShardManifest | None:
    try:
        manifest = read_manifest(out_dir, options)
    except DataError:
        return None
    if manifest.provenance.get("fingerprint") != fingerprint:
        return None
    fs, root = filesystem(out_dir, options)
    shards = [s.path for v in manifest.splits.values() for s in v]
    if not all(fs.exists(posixpath.join(root, p)) for p in shards):
        return None
    return manifest


def _plan(
    refs: list[ImageRef],
    ids: np.ndarray,
    parts: dict[str, np.ndarray],
    cfg: DataConfig,
    out_dir: str,
    options: Mapping[str, Any],
) -> list[_ShardTask]:
    tasks = []
    for n, split in enumerate(SPLITS):
        # Shuffled within the split (seeded): a shard mixes classes, as a shuffle buffer wants.
        order = np.random.default_rng([cfg.seed, n]).permutation(parts[split])
        for index, start in enumerate(range(0, len(order), cfg.shard_samples)):
            chunk = order[start : start + cfg.shard_samples]
            tasks.append(
                _ShardTask(
                    out_dir,
                    split,
                    index,
                    tuple(refs[int(i)] for i in chunk),
                    tuple(int(ids[i]) for i in chunk),
                    cfg.image_mode,
                    cfg.image_size,
                    options,
                    cfg.max_image_pixels,
                )
            )
    return tasks


def _run(tasks: list[Any], num_workers: int, work: Any = _write_shard) -> list[Any]:
    """``work`` (a shard writer: images', or detection's) on every task, in ``num_workers``
    processes."""
    if num_workers <= 0 or len(tasks) == 1:
        return [work(t) for t in tasks]
    # fork where there is one: workers start in milliseconds, and a caller's script needs no
    # ``__main__`` guard (spawn re-runs it). fsspec is fork-safe: it drops cached filesystems
    # and its event loop in the child, so each worker opens its own connections.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(min(num_workers, len(tasks)), mp_context=ctx) as pool:
        return list(pool.map(work, tasks))


@dataclass
class _Totals:
    """Every shard's results added up, per split where the manifest wants them so."""

    splits: dict[str, list[ShardInfo]]
    counts: dict[str, Counter]
    skipped: list[tuple[str, str]]
    shapes: set[tuple[int, int]]

    @classmethod
    def of(cls, results: list[_ShardResult]) -> _Totals:
        totals = cls({s: [] for s in SPLITS}, {s: Counter() for s in SPLITS}, [], set())
        for r in results:
            if r.shard is not None:
                totals.splits[r.task.split].append(r.shard)
            totals.counts[r.task.split].update(r.class_counts)
            totals.skipped += r.skipped
            totals.shapes |= r.shapes
        return totals


def _manifest(
    results: list[_ShardResult],
    classes: list[str],
    refs: list[ImageRef],
    cfg: DataConfig,
    fingerprint: str,
) -> ShardManifest:
    """The dataset's manifest from every shard's result, once every class has an image."""
    totals = _Totals.of(results)
    _refuse_undecodable(totals, classes, refs, cfg)
    return ShardManifest(
        splits=totals.splits,
        class_counts={
            s: dict(sorted(c.items(), key=lambda kv: int(kv[0]))) for s, c in totals.counts.items()
        },
        columns={"image": "bytes", "label": "int"},
        meta=_image_meta(totals, classes, cfg),
        provenance=_image_provenance(totals, refs, cfg, fingerprint),
    )


def _refuse_undecodable(
    totals: _Totals, classes: list[str], refs: list[ImageRef], cfg: DataConfig
) -> None:
    """A DataError when no image decodes, or none of one class does (it could not be learnt)."""
    skipped = totals.skipped
    if len(skipped) == len(refs):
        raise DataError(
            f"data error: {cfg.source}: none of its {len(refs)} images decodes "
            f"(e.g. {skipped[0][0]}: {skipped[0][1]})"
        )
    total: Counter[str] = Counter()
    for c in totals.counts.values():
        total.update(c)
    for class_id, name in enumerate(classes):
        if not total[str(class_id)]:
            raise DataError(f"data error: {cfg.source}: none of class {name!r}'s images decodes")


def _image_meta(totals: _Totals, classes: list[str], cfg: DataConfig) -> dict[str, Any]:
    """What a model needs to know of the images; ``input_shape`` only when all share one size."""
    channels = 3 if cfg.image_mode == "RGB" else 1
    (height, width), *others = sorted(totals.shapes)
    return {
        "kind": "images",
        "classes": classes,
        "image_mode": cfg.image_mode,
        "image_size": cfg.image_size,
        "input_shape": None if others else [channels, height, width],
        "bytes": {s: sum(x.bytes for x in v) for s, v in totals.splits.items()},
    }


def _image_provenance(
    totals: _Totals, refs: list[ImageRef], cfg: DataConfig, fingerprint: str
) -> dict[str, Any]:
    """Where the images came from, which were skipped and why, and the input's fingerprint."""
    skipped = totals.skipped
    return {
        "source": cfg.source,
        "num_listed": len(refs),
        "num_skipped": len(skipped),
        "skipped_by_reason": dict(Counter(skip_reason(why) for _, why in skipped)),
        "skipped": [list(s) for s in skipped[:SKIPPED_SHOWN]],
        "fingerprint": fingerprint,
    }


def _remove_manifest(out_dir: str, options: Mapping[str, Any]) -> None:
    fs, root = filesystem(out_dir, options)
    path = posixpath.join(root, MANIFEST)
    if fs.exists(path):
        fs.rm(path)


def _remove_shards(
    out_dir: str, keep: list[str], options: Mapping[str, Any], temporary: bool = False
) -> None:
    """Delete shard files of ``out_dir`` that ``keep`` does not name (a previous build's), and
    with ``temporary`` the writers' temporary files (``.<shard>.tmp``) too."""
    fs, root = filesystem(out_dir, options)
    if not fs.exists(root):
        return
    for path in fs.find(root, maxdepth=1):
        name = posixpath.basename(path)
        shard = name.split("-")[0] in SPLITS and name.endswith(".parquet") and name not in keep
        half = temporary and name.startswith(".") and name.endswith(".parquet.tmp")
        if shard or half:
            fs.rm(path)


# -- plan, convert, merge (kubetrain.data.fanout) -------------------------------------------------
IMAGE_LISTING = "images.parquet"  # the plan's listing: every image's file and class id
IMAGE_CLASSES = "classes.json"


@dataclass
class ImagePlan:
    """What the plan fixes before any pixel is read: every listed image (file and class id),
    the stratified split, and from those (``_plan``, seeded) every shard's images in order;
    ``record`` holds the shards as slots and each convert task's range of them."""

    refs: list[ImageRef]
    ids: np.ndarray
    classes: list[str]
    parts: dict[str, np.ndarray]
    record: PreprocessPlan

    def save(self, directory: str | Path) -> None:
        """Write the listing, the split and the classes into ``directory`` (the plan record is
        the caller's: ``kubetrain.core.artifacts.PlanArtifact``)."""
        import pyarrow as pa

        from kubetrain.data.fanout import save_plan_files

        columns = {
            "url": [r.url for r in self.refs],
            "offset": pa.array([r.offset for r in self.refs], pa.int64()),
            "size": pa.array([r.size for r in self.refs], pa.int64()),
            "member": [r.member for r in self.refs],
            "class_id": pa.array(self.ids.astype(np.int64), pa.int64()),
        }
        save_plan_files(directory, (IMAGE_LISTING, columns), self.parts,
                        (IMAGE_CLASSES, self.classes))  # fmt: skip

    @classmethod
    def load(cls, directory: str | Path, record: PreprocessPlan) -> ImagePlan:
        """The plan saved in ``directory`` with its ``record``; raises DataError if a file is
        missing or unreadable."""
        from kubetrain.data.fanout import load_plan_files

        table, parts, classes = load_plan_files(
            directory, IMAGE_LISTING, IMAGE_CLASSES, "an image plan"
        )
        ids = np.asarray(table["class_id"], dtype=np.int64)
        refs = [
            ImageRef(url, classes[int(c)], int(o), int(n), m)
            for url, o, n, m, c in zip(
                table["url"], table["offset"], table["size"], table["member"], ids, strict=True
            )
        ]
        return cls(refs, ids, list(classes), parts, record)


def stats_quotas(plan: PreprocessPlan, limit: int = STATS_IMAGES) -> list[int]:
    """Per slot, how many of its images the channel statistics read: the training split's
    first ``limit`` images in shard order, by the plan's counts (so a convert task knows its
    share without the others; images that do not decode are not made up for)."""
    quotas, seen = [], 0
    for slot in plan.slots:
        take = max(0, min(slot.samples, limit - seen)) if slot.split == "train" else 0
        seen += take
        quotas.append(take)
    return quotas


def pixel_sums(images: Sequence[bytes], mode: str) -> PixelSums:
    """Per-channel float64 sums of pixel values (0..1) and of their squares over encoded
    ``images``, converted to ``mode``, summed image by image in order."""
    from PIL import Image

    channels = len(mode)
    sums = np.zeros(channels, np.float64)
    squares = np.zeros(channels, np.float64)
    pixels = 0
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            a = np.asarray(img.convert(mode), dtype=np.float64) / 255.0
        a = a.reshape(-1, channels)
        sums += a.sum(0)
        squares += (a * a).sum(0)
        pixels += len(a)
    return PixelSums(sum=sums.tolist(), squares=squares.tolist(), pixels=pixels, images=len(images))


def mean_std(sums: PixelSums) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (rounded to 1e-6, std at least 1e-3) from pixel sums.

    Raises:
        DataError: the sums cover no pixel.
    """
    if not sums.pixels:
        raise DataError("data error: the training split has no images")
    mean = np.asarray(sums.sum, np.float64) / sums.pixels
    std = np.sqrt(np.maximum(np.asarray(sums.squares, np.float64) / sums.pixels - mean**2, 1e-12))
    return [round(float(v), 6) for v in mean], [round(float(max(v, 1e-3)), 6) for v in std]


def plan_image_shards(
    cfg: DataConfig, num_tasks: int, listing: ImageListing | None = None
) -> ImagePlan:
    """Plan the sharded image dataset of ``cfg`` for ``num_tasks`` convert tasks.

    Lists the source (unless ``listing`` is given), maps labels to class ids, draws the
    stratified split and fixes every shard's images (``_plan``, seeded: the same for every
    ``num_tasks``); then cuts the shards into contiguous ranges of about equal size.

    Raises:
        DataError, ConfigError: as ``build_image_dataset``.
    """
    from kubetrain.data.fanout import assign_ranges, slots_of

    options = dict(cfg.storage_options)
    listing = listing if listing is not None else _list(cfg, options)
    ids, classes, parts = _classes_and_splits(listing.refs, cfg)
    tasks = _plan(listing.refs, ids, parts, cfg, "", options)
    slots = slots_of((t.split, t.index, len(t.refs)) for t in tasks)
    record = PreprocessPlan(
        kind="images",
        source=cfg.source,
        fingerprint=_fingerprint(listing.fingerprint, cfg),
        num_tasks=num_tasks,
        slots=slots,
        ranges=assign_ranges([s.samples for s in slots], num_tasks),
    )
    return ImagePlan(listing.refs, ids, classes, parts, record)


def _write_and_sum(job: tuple[_ShardTask, int]) -> tuple[_ShardResult, PixelSums | None]:
    """Write one shard, then sum the pixels of its first ``quota`` stored images (a worker)."""
    from kubetrain.data.shards import read_shard

    task, quota = job
    result = _write_shard(task)
    if not quota or result.shard is None:
        return result, None
    images = read_shard(task.root, result.shard, task.storage_options)["image"][:quota]
    return result, pixel_sums(images, task.mode)


def convert_image_shards(
    cfg: DataConfig, plan: ImagePlan, slots: Sequence[int], root: str
) -> list[SlotResult]:
    """Decode, convert and write the shards of ``slots`` (slot numbers of the plan) into
    ``root`` with ``cfg.num_workers`` processes; returns what each wrote, in order.

    Raises:
        DataError: the store fails (a missing or undecodable image is skipped and counted).
    """
    from kubetrain.data.fanout import shard_record

    tasks = _plan(plan.refs, plan.ids, plan.parts, cfg, root, dict(cfg.storage_options))
    quotas = stats_quotas(plan.record)
    done = _run([(tasks[i], quotas[i]) for i in slots], cfg.num_workers, _write_and_sum)
    return [
        SlotResult(
            slot=i,
            shard=shard_record(r.shard) if r.shard is not None else None,
            samples=r.shard.num_samples if r.shard is not None else 0,
            class_counts=dict(r.class_counts),
            skipped=list(r.skipped),
            shapes=sorted(r.shapes),
            pixel_sums=sums,
        )
        for i, (r, sums) in zip(slots, done, strict=True)
    ]


def merge_image_shards(
    cfg: DataConfig, plan: ImagePlan, results: Sequence[SlotResult], root: str
) -> ShardManifest:
    """The manifest of every slot's shard at ``root`` (written last), with the training
    split's pixel sums in its provenance (combined in slot order); shards a previous build left
    at ``root`` are removed.

    Args:
        cfg: the ``data`` section the plan was made with.
        plan: the plan.
        results: every slot's result, in slot order (``kubetrain.data.fanout.ordered_results``).
        root: where the shards are (and the manifest goes).

    Raises:
        DataError: no image decodes, or none of a class's.
    """
    from kubetrain.data.fanout import shard_info

    options = dict(cfg.storage_options)
    tasks = _plan(plan.refs, plan.ids, plan.parts, cfg, root, options)
    written = [
        _ShardResult(
            tasks[r.slot],
            shard_info(r.shard) if r.shard is not None else None,
            Counter(r.class_counts),
            [(name, why) for name, why in r.skipped],
            {(h, w) for h, w in r.shapes},
        )
        for r in results
    ]
    manifest = _manifest(written, plan.classes, plan.refs, cfg, plan.record.fingerprint)
    total: PixelSums | None = None
    for r in results:  # slot order: the same float64 sums whichever task made each part
        if r.pixel_sums is not None:
            total = r.pixel_sums if total is None else total.plus(r.pixel_sums)
    if total is not None:
        manifest.provenance["pixel_sums"] = total.to_json()
    save_manifest(root, manifest, options)
    _remove_shards(root, [s.path for v in manifest.splits.values() for s in v], options)
    return manifest
