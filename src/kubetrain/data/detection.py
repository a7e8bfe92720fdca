"""Object-detection datasets: COCO, Pascal VOC and YOLO sources checked, split and written as
shards, in parallel.

``build_detection_dataset`` turns a box-annotated source into the sharded format
(``kubetrain.data.shards``) that training streams: one record per image, ``{"image": <encoded
bytes>, "boxes": <float32 x1,y1,x2,y2 bytes>, "labels": <int array, 1..K>, "image_id": <int>,
"source": <the image's id in the source>, "width", "height"}``; the manifest's ``meta`` holds
the categories (their own ids and names: the labels map back to them in every output),
``provenance`` what was clipped, dropped or skipped.

Sources (a local path or any fsspec URI; ``data.annotation_format`` or found from the layout):

- **COCO**: ``instances_*.json`` (a file, or a folder with ``annotations/instances_*.json``) and
  the images under ``<root>/<split>/``, ``<root>/images/<split>/``, ``<root>/images/`` or
  ``<root>/`` (the first that holds the first listed image); several JSON files are read as one
  dataset (their image ids are kept apart).
- **Pascal VOC**: ``Annotations/*.xml`` (one per image) and ``JPEGImages/``; boxes are VOC's
  1-based pixel corners, moved to 0-based.
- **YOLO**: ``images/**`` beside ``labels/**`` (``<stem>.txt``: ``class cx cy w h``, normalised
  to the image), class names from ``data.yaml`` (``names``) or ``classes.txt``; an image without
  a label file has no objects.

Checks (one warning with the counts and a first example of each, or one line when nothing usable
is left): a box reaching outside its image is clipped, one of zero or negative size dropped, an
annotation with an unknown category id or whose image is not listed dropped, a crowd region
(COCO ``iscrowd``) dropped, an image that does not decode or is missing skipped. Images without
objects are kept: they are samples too. The split is stratified on the rarest class each image
holds (``kubetrain.data.boxes.strata``).

Like ``kubetrain.data.images``, only Pillow, numpy, pyarrow and fsspec are imported (no torch).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kubetrain.core.errors import ConfigError, DataError
from kubetrain.core.records import PreprocessPlan, SlotResult
from kubetrain.data.boxes import BoxCounts, Categories, check_boxes, cxcywh_to_xyxy, strata
from kubetrain.data.config import DataConfig
from kubetrain.data.dataset import split_indices
from kubetrain.data.image_sources import IMAGE_SUFFIXES, ImageRef, filesystem, read_bytes
from kubetrain.data.images import (
    SKIPPED_SHOWN,
    SPLITS,
    ImageDecodeError,
    _cached,
    _remove_manifest,
    _remove_shards,
    _run,
)
from kubetrain.data.shards import ShardInfo, ShardManifest, ShardWriter, save_manifest

log = logging.getLogger(__name__)

FORMATS = ("coco", "voc", "yolo")
# Bump when records or checks change: old shards are then rebuilt.
DETECTION_FORMAT = 1


@dataclass
class DetectionRef:
    """One image and its annotations as the source writes them.

    ``boxes``: ``(N, 4)``: ``x1, y1, x2, y2`` in pixels, or, with ``normalized`` (YOLO),
    ``cx, cy, w, h`` as fractions of the image's size (known once it is decoded). ``labels``:
    ``1..K`` (the categories' order). ``index``: the image's id in the dataset; ``source``: its
    id in the source (COCO's image id; a VOC or YOLO image's file name), kept in the records.
    """

    image: ImageRef
    boxes: np.ndarray
    labels: np.ndarray
    index: int = 0
    normalized: bool = False
    source: str = ""

    @property
    def name(self) -> str:
        return self.image.name


@dataclass
class DetectionListing:
    """Every image of a source with its annotations, the categories, what the annotation files
    already dropped, and a fingerprint of the inputs (the cache key)."""

    format: str
    refs: list[DetectionRef]
    categories: Categories
    counts: BoxCounts
    fingerprint: str
    annotation_files: list[str] = field(default_factory=list)


# -- which format ------------------------------------------------------------------------------
def annotation_format(source: str, wanted: str, options: Mapping[str, Any] | None = None) -> str:
    """The annotation format of ``source``: ``wanted`` unless it is ``auto``, else found from
    the layout (a ``.json`` file or ``annotations/*.json``: COCO; ``Annotations/``: VOC;
    ``labels/``: YOLO).

    Raises:
        DataError: the source does not exist, or no layout is recognised (one line saying what
            each format looks like).
    """
    if wanted != "auto":
        return wanted
    fs, path = filesystem(source, options)
    path = path.rstrip("/")
    if path.lower().endswith(".json"):
        return "coco"
    if not fs.exists(path):
        raise DataError(f"data error: {source}: not found")
    names = {posixpath.basename(str(p).rstrip("/")) for p in fs.ls(path, detail=False)}
    if "annotations" in names and fs.glob(posixpath.join(path, "annotations", "*.json")):
        return "coco"
    if "Annotations" in names:
        return "voc"
    if "labels" in names and "images" in names:
        return "yolo"
    if any(n.lower().endswith(".json") for n in names):
        return "coco"
    raise DataError(
        f"data error: {source}: not a detection source: expected annotations/instances_*.json "
        "(COCO), Annotations/*.xml (Pascal VOC) or images/ + labels/ (YOLO); set "
        "data.annotation_format to say which"
    )


def list_detection(
    source: str,
    fmt: str = "auto",
    storage_options: Mapping[str, Any] | None = None,
    num_threads: int = 8,
) -> DetectionListing:
    """Every image of a detection source with its boxes and labels.

    Args:
        source: a COCO JSON file or folder, a VOC folder or a YOLO folder (local or fsspec URI).
        fmt: ``auto``, ``coco``, ``voc`` or ``yolo``.
        storage_options: fsspec options for remote URIs.
        num_threads: parallel reads of per-image annotation files (VOC, YOLO).

    Returns:
        The listing; images in a fixed order (annotation order for COCO, sorted paths else).

    Raises:
        DataError: a missing or malformed annotation file (named), no images, no categories.
    """
    fmt = annotation_format(source, fmt, storage_options)
    reader = {"coco": _list_coco, "voc": _list_voc, "yolo": _list_yolo}[fmt]
    listing = reader(source, dict(storage_options or {}), max(1, num_threads))
    if not listing.refs:
        raise DataError(f"data error: {source}: the {fmt} annotations list no images")
    for i, ref in enumerate(listing.refs):
        ref.index = i
    return listing


def _digest(kind: str, entries: list[str]) -> str:
    h = hashlib.sha256(kind.encode())
    for entry in entries:
        h.update(entry.encode() + b"\n")
    return h.hexdigest()[:16]


def _stamp(fs, path: str) -> str:
    from kubetrain.data.image_sources import _stamp as stamp

    try:
        return stamp(fs.info(path))
    except (FileNotFoundError, OSError):
        return "missing"


def _url(fs, path: str) -> str:
    from kubetrain.data.image_sources import _url as url

    return url(fs, path)


def _image_stamps(fs, folder: str) -> list[str]:
    """``relative path|size:mtime`` of every image under ``folder``: what says they changed."""
    found = fs.find(folder, detail=True) if fs.isdir(folder) else {}
    return sorted(
        f"{p[len(folder) + 1 :]}|{_stamp_info(info)}"
        for p, info in found.items()
        if p.lower().endswith(IMAGE_SUFFIXES)
    )


def _stamp_info(info: Mapping[str, Any]) -> str:
    from kubetrain.data.image_sources import _stamp as stamp

    return stamp(info)


# -- COCO --------------------------------------------------------------------------------------
def _coco_files(fs, path: str, source: str) -> tuple[list[str], str]:
    """The COCO JSON files of ``source`` and the dataset root the image folders hang from."""
    if path.lower().endswith(".json"):
        if not fs.isfile(path):
            raise DataError(f"data error: {source}: not found")
        folder = posixpath.dirname(path)
        root = posixpath.dirname(folder) if posixpath.basename(folder) == "annotations" else folder
        return [path], root
    files = sorted(fs.glob(posixpath.join(path, "annotations", "instances_*.json")))
    files = files or sorted(fs.glob(posixpath.join(path, "annotations", "*.json")))
    files = files or sorted(fs.glob(posixpath.join(path, "*.json")))
    if not files:
        raise DataError(f"data error: {source}: no COCO annotations (annotations/instances_*.json)")
    return files, path


def _coco_split_name(file: str) -> str:
    stem = posixpath.basename(file).rsplit(".", 1)[0]
    return stem.split("_", 1)[1] if stem.startswith("instances_") else stem


def _coco_image_folder(fs, root: str, file: str, first: str | None) -> str:
    """Where the images of annotation file ``file`` are: the first candidate folder that holds
    its first image (``root`` when it lists none).

    Raises:
        DataError: none of the candidates holds it.
    """
    split = _coco_split_name(file)
    candidates = [posixpath.join(root, split), posixpath.join(root, "images", split),
                  posixpath.join(root, "images"), root]  # fmt: skip
    if first is None:
        return root
    for folder in candidates:
        if fs.exists(posixpath.join(folder, first)):
            return folder
    raise DataError(
        f"data error: {file}: its first image {first!r} is in none of "
        f"{', '.join(c + '/' for c in candidates)}"
    )


def _read_json(fs, path: str) -> Any:
    try:
        with fs.open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"data error: {path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"data error: {path}: not valid JSON ({err})") from None


def _list_coco(source: str, options: dict, num_threads: int) -> DetectionListing:
    fs, path = filesystem(source, options)
    files, root = _coco_files(fs, path.rstrip("/"), source)
    counts = BoxCounts()
    pairs: dict[int, str] = {}
    per_file = []
    for file in files:
        data = _read_json(fs, file)
        try:
            images = list(data["images"])
            annotations = list(data.get("annotations") or [])
            cats = [(int(c["id"]), str(c["name"])) for c in data["categories"]]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"data error: {file}: not COCO instances (needs images, annotations, "
                f"categories with id and name: {type(err).__name__} {err})"
            ) from None
        for cid, name in cats:
            if pairs.get(cid, name) != name:
                raise DataError(
                    f"data error: {file}: category id {cid} is {name!r} here and "
                    f"{pairs[cid]!r} in an earlier file"
                )
            pairs[cid] = name
        per_file.append((file, images, annotations))
    if not pairs:
        raise DataError(f"data error: {files[0]}: no categories")
    categories = Categories.from_pairs(list(pairs.items()))
    refs: list[DetectionRef] = []
    entries: list[str] = []
    for file, images, annotations in per_file:
        refs += _coco_refs(fs, root, file, images, annotations, categories, counts)
        entries.append(f"{file}|{_stamp(fs, file)}")
    folders = sorted({posixpath.dirname(r.image.url) for r in refs})
    for folder in folders[:64]:  # an image folder's listing says when its images change
        entries += _image_stamps(fs, _local_path(fs, folder))
    return DetectionListing("coco", refs, categories, counts, _digest("coco", entries), files)


def _local_path(fs, url: str) -> str:
    return fs._strip_protocol(url)


def _coco_refs(fs, root, file, images, annotations, categories, counts) -> list[DetectionRef]:
    by_id: dict[Any, Mapping[str, Any]] = {}
    for img in images:
        if not isinstance(img, Mapping) or "id" not in img or "file_name" not in img:
            counts.drop("malformed", file)
            continue
        by_id[img["id"]] = img
    boxes: dict[Any, list] = {i: [] for i in by_id}
    cat_ids = set(categories.ids)
    for ann in annotations:
        try:
            image_id, cat, bbox = ann["image_id"], int(ann["category_id"]), ann["bbox"]
            x, y, w, h = (float(v) for v in bbox)
        except (KeyError, TypeError, ValueError):
            counts.drop("malformed", file)
            continue
        if image_id not in by_id:
            counts.drop("missing_image", f"{file}: annotation {ann.get('id')} of image {image_id}")
            continue
        if cat not in cat_ids:
            counts.drop("unknown_category", f"{file}: annotation {ann.get('id')}: id {cat}")
            continue
        if ann.get("iscrowd"):
            counts.drop("crowd", file)
            continue
        boxes[image_id].append((x, y, x + w, y + h, cat))
    first = next(iter(by_id.values()), None)
    folder = _coco_image_folder(fs, root, file, first["file_name"] if first else None)
    refs = []
    for image_id, img in by_id.items():
        rows = np.array(boxes[image_id], dtype=np.float64).reshape(-1, 5)
        url = _url(fs, posixpath.join(folder, str(img["file_name"])))
        labels = categories.labels(rows[:, 4])
        refs.append(DetectionRef(ImageRef(url, None), rows[:, :4].copy(), labels,
                                 source=str(image_id)))  # fmt: skip
    return refs


# -- Pascal VOC --------------------------------------------------------------------------------
def _parse_voc(text: bytes, where: str) -> tuple[str | None, list[tuple[str, tuple]], int]:
    """``(file name, [(class name, (x1, y1, x2, y2))], malformed objects)`` of one VOC XML."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise DataError(f"data error: {where}: not valid XML ({err})") from None
    filename = root.findtext("filename")
    objects, malformed = [], 0
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        try:
            if box is None:
                raise ValueError("no bndbox")
            corners = tuple(float(box.findtext(k) or "") for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            malformed += 1
            continue
        if not name:
            malformed += 1
            continue
        # VOC numbers pixels from 1: the corner of the first pixel is 0 in XYXY pixel space.
        objects.append((name, (corners[0] - 1, corners[1] - 1, corners[2], corners[3])))
    return filename, objects, malformed


def _list_voc(source: str, options: dict, num_threads: int) -> DetectionListing:
    fs, path = filesystem(source, options)
    root = path.rstrip("/")
    xmls = sorted(fs.glob(posixpath.join(root, "Annotations", "*.xml")))
    if not xmls:
        raise DataError(f"data error: {source}: no Annotations/*.xml (Pascal VOC)")

    def read(p: str):
        with fs.open(p, "rb") as f:
            return _parse_voc(f.read(), p)

    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        parsed = list(pool.map(read, xmls))
    names = sorted({n for _, objects, _ in parsed for n, _ in objects})
    if not names:
        raise DataError(f"data error: {source}: no object in any of its {len(xmls)} XML files")
    categories = Categories.from_pairs([(i + 1, n) for i, n in enumerate(names)])
    ids = {n: i + 1 for i, n in enumerate(names)}
    counts, refs = BoxCounts(), []
    images = posixpath.join(root, "JPEGImages")
    for xml, (filename, objects, malformed) in zip(xmls, parsed, strict=True):
        if malformed:
            counts.drop("malformed", xml, malformed)
        stem = posixpath.basename(xml)[: -len(".xml")]
        url = _url(fs, posixpath.join(images, filename or f"{stem}.jpg"))
        boxes = np.array([b for _, b in objects], dtype=np.float64).reshape(-1, 4)
        labels = categories.labels(np.array([ids[n] for n, _ in objects], dtype=np.int64))
        refs.append(DetectionRef(ImageRef(url, None), boxes, labels,
                                 source=filename or f"{stem}.jpg"))  # fmt: skip
    entries = [f"{x}|{_stamp(fs, x)}" for x in xmls] + _image_stamps(fs, images)
    return DetectionListing("voc", refs, categories, counts, _digest("voc", entries), xmls)


# -- YOLO --------------------------------------------------------------------------------------
def _yolo_classes(fs, root: str, source: str) -> tuple[list[str], str]:
    """The class names of a YOLO folder (``data.yaml``'s ``names``, else ``classes.txt``)."""
    import yaml

    for name in ("data.yaml", "dataset.yaml", "data.yml"):
        path = posixpath.join(root, name)
        if fs.isfile(path):
            with fs.open(path, "rb") as f:
                try:
                    data = yaml.safe_load(f) or {}
                except yaml.YAMLError as err:
                    raise DataError(f"data error: {path}: not valid YAML ({err})") from None
            names = data.get("names") if isinstance(data, Mapping) else None
            if isinstance(names, Mapping):
                try:
                    names = [str(names[k]) for k in sorted(names, key=int)]
                except (TypeError, ValueError):
                    names = None
            if not isinstance(names, list) or not names:
                raise DataError(f"data error: {path}: no 'names' list of class names")
            return [str(n) for n in names], path
    path = posixpath.join(root, "classes.txt")
    if fs.isfile(path):
        with fs.open(path, "rt") as f:
            names = [line.strip() for line in f if line.strip()]
        if names:
            return names, path
    raise DataError(
        f"data error: {source}: a YOLO folder needs its class names in data.yaml (names: [...]) "
        "or classes.txt (one per line)"
    )


def _parse_yolo(text: str, num_classes: int, where: str, counts: BoxCounts) -> tuple:
    rows, classes = [], []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            cls, values = int(parts[0]), [float(v) for v in parts[1:]]
        except ValueError:
            counts.drop("malformed", where)
            continue
        if len(values) != 4:  # segments and keypoints are not boxes
            counts.drop("malformed", where)
            continue
        if not 0 <= cls < num_classes:
            counts.drop("unknown_category", f"{where}: class {cls}")
            continue
        rows.append(values)
        classes.append(cls)
    return np.array(rows, dtype=np.float64).reshape(-1, 4), np.array(classes, dtype=np.int64)


def _list_yolo(source: str, options: dict, num_threads: int) -> DetectionListing:
    fs, path = filesystem(source, options)
    root = path.rstrip("/")
    names, names_file = _yolo_classes(fs, root, source)
    categories = Categories.from_pairs(list(enumerate(names)))
    image_root, label_root = posixpath.join(root, "images"), posixpath.join(root, "labels")
    found = fs.find(image_root, detail=True)
    images = sorted(p for p in found if p.lower().endswith(IMAGE_SUFFIXES))
    labels = set(fs.find(label_root)) if fs.exists(label_root) else set()

    def label_of(image: str) -> str:
        rel = image[len(image_root) + 1 :]
        return posixpath.join(label_root, rel.rsplit(".", 1)[0] + ".txt")

    def read(image: str) -> tuple[str, str]:
        p = label_of(image)
        if p not in labels:
            return p, ""
        with fs.open(p, "rt") as f:
            return p, f.read()

    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        texts = list(pool.map(read, images))
    counts, refs, entries = BoxCounts(), [], [f"{names_file}|{_stamp(fs, names_file)}"]
    for image, (label_path, text) in zip(images, texts, strict=True):
        boxes, classes = _parse_yolo(text, len(names), label_path, counts)
        refs.append(DetectionRef(ImageRef(_url(fs, image), None), boxes, classes + 1,
                                 normalized=True, source=image[len(image_root) + 1 :]))  # fmt: skip
        entries.append(
            f"{image[len(root) + 1 :]}|{_stamp_info(found[image])}|"
            f"{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        )
    return DetectionListing(
        "yolo", refs, categories, counts, _digest("yolo", entries), [names_file]
    )


# -- writing shards ----------------------------------------------------------------------------
def decode_for_boxes(data: bytes, mode: str) -> tuple[bytes, int, int]:
    """Decode ``data`` completely, convert it to ``mode``; returns ``(encoded, width, height)``.

    No EXIF rotation: box annotations refer to the stored pixel grid, as pycocotools and
    torchvision's decoders read it. A JPEG or PNG already in ``mode`` keeps its bytes.

    Raises:
        ImageDecodeError: the bytes are not a complete image.
    """
    from PIL import Image, UnidentifiedImageError

    from kubetrain.data.images import _to_mode

    if not data:
        raise ImageDecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image format Pillow knows") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(str(err) or type(err).__name__) from None
    if img.mode == mode and fmt in ("JPEG", "PNG"):
        return data, img.width, img.height
    img = _to_mode(img, mode)
    out = io.BytesIO()
    img.save(
        out, format="JPEG" if fmt == "JPEG" else "PNG", **({"quality": 95} if fmt == "JPEG" else {})
    )
    return out.getvalue(), img.width, img.height


@dataclass(frozen=True)
class _ShardTask:
    root: str
    split: str
    index: int
    refs: tuple[DetectionRef, ...]
    mode: str
    storage_options: Mapping[str, Any]


@dataclass
class _ShardResult:
    task: _ShardTask
    shard: ShardInfo | None
    objects: Counter
    empty_images: int
    counts: BoxCounts
    skipped: list[tuple[str, str]]


def _write_shard(task: _ShardTask) -> _ShardResult:
    """Decode, check the boxes of and write one shard (runs in a worker process)."""
    writer = ShardWriter(task.root, task.split, max_samples=len(task.refs) + 1,
                         max_bytes=1 << 62, storage_options=task.storage_options,
                         label_column=None, first_index=task.index)  # fmt: skip
    objects: Counter = Counter()
    counts, skipped, empty = BoxCounts(), [], 0
    for ref in task.refs:
        try:
            image, width, height = decode_for_boxes(read_bytes(ref.image, task.storage_options),
                                                    task.mode)  # fmt: skip
        except FileNotFoundError:
            skipped.append((ref.name, "missing"))
            continue
        except ImageDecodeError as err:
            skipped.append((ref.name, str(err)))
            continue
        except OSError as err:
            raise DataError(f"data error: {ref.name}: cannot read ({err})") from None
        boxes = ref.boxes.copy()
        if ref.normalized:
            boxes = cxcywh_to_xyxy(boxes * np.array([width, height, width, height]))
        keep = check_boxes(boxes, width, height, counts, ref.name)
        labels = ref.labels[keep].astype(np.int64)
        writer.write({
            "image": image,
            "boxes": boxes[keep].astype(np.float32).tobytes(),
            "labels": labels,
            "image_id": int(ref.index),
            "source": ref.source,
            "width": int(width),
            "height": int(height),
        })  # fmt: skip
        objects.update(str(int(v)) for v in labels)
        empty += not len(labels)
    writer.close()
    shard = writer.shards[0] if writer.shards else None
    return _ShardResult(task, shard, objects, empty, counts, skipped)


def _fingerprint(listing: DetectionListing, cfg: DataConfig) -> str:
    settings = {
        "format": DETECTION_FORMAT,
        "listing": listing.fingerprint,
        "annotation_format": listing.format,
        **cfg.model_dump(include={"image_mode", "shard_samples", "seed", "val_fraction",
                                  "test_fraction"}),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def split_detection(listing: DetectionListing, cfg: DataConfig) -> dict[str, np.ndarray]:
    """The train/val/test split of the listing's images, stratified on the rarest class each
    holds (seeded by ``cfg.seed``).

    Raises:
        DataError: too few images to split (naming the source).
    """
    # A stratum must keep two images in the held-out part, which is split again into val/test.
    held_out = cfg.val_fraction + cfg.test_fraction
    min_count = max(3, int(np.ceil(3 / min(held_out, cfg.val_fraction / held_out,
                                           cfg.test_fraction / held_out))))  # fmt: skip
    keys = strata([r.labels for r in listing.refs], min_count)
    _, ids = np.unique(keys, return_inverse=True)
    try:
        try:
            return split_indices(ids.astype(np.int64), cfg)
        except DataError:  # strata too small for the fractions: a plain seeded split
            log.info("%s: too few images per class for a stratified split", cfg.source)
            return split_indices(np.zeros(len(ids), dtype=np.int64), cfg)
    except DataError as err:
        raise DataError(str(err).replace("data error:", f"data error: {cfg.source}:", 1)) from None


def build_detection_dataset(cfg: DataConfig, out_dir: str) -> ShardManifest:
    """Build the sharded detection dataset that ``cfg`` describes at ``out_dir``.

    Lists ``cfg.source`` (``cfg.annotation_format``), draws the stratified split, then decodes
    the images, checks their boxes and writes the shards of every split with ``cfg.num_workers``
    worker processes; the manifest is written last. A rebuild of an unchanged source (same
    annotations, same image listing, same settings) is skipped.

    Args:
        cfg: the ``data`` section (source, annotation_format, storage_options, image_mode,
            shard_samples, val/test fractions, seed, num_workers).
        out_dir: where the shards and ``shards.json`` go (local path or fsspec URI).

    Returns:
        The manifest: ``meta`` has ``kind`` (``detection``), ``categories``, ``classes``,
        ``image_mode``, ``annotation_format``, ``objects`` and ``empty_images`` per split;
        ``provenance`` has ``source``, ``num_listed``, ``num_skipped``, ``skipped``, ``boxes``
        (kept, clipped, dropped by reason, with a first example each) and ``fingerprint``.

    Raises:
        DataError: a missing or malformed source (named), too few images to split, no image
            that decodes, no box left after the checks.
        ConfigError: ``data.image_size`` (stored images are not resized: boxes would move).
    """
    started = time.perf_counter()
    options = dict(cfg.storage_options)
    _refuse_image_size(cfg)
    listing = list_detection(cfg.source, cfg.annotation_format, options,
                             max(4, cfg.num_workers * 2))  # fmt: skip
    cached = _cached(str(out_dir), _fingerprint(listing, cfg), options)
    if cached is not None:
        log.info("%s: unchanged input, reusing dataset %s", out_dir, cached.version)
        return cached
    plan = plan_detection_shards(cfg, 1, listing)
    _remove_manifest(str(out_dir), options)
    try:
        results = convert_detection_shards(cfg, plan, range(len(plan.record.slots)), str(out_dir))
        manifest = merge_detection_shards(cfg, plan, results, str(out_dir))
    except DataError:
        _remove_shards(str(out_dir), [], options)
        raise
    _log_built(cfg, manifest, len(listing.refs), started)
    return manifest


def _refuse_image_size(cfg: DataConfig) -> None:
    if cfg.image_size is not None:
        raise ConfigError(
            "config error: data.image_size: detection stores images at their size (a square crop "
            "would cut boxes); resize in data.transforms or with the detector's min_size/max_size"
        )


def _shard_tasks(
    refs: list[DetectionRef], parts: dict[str, np.ndarray], cfg: DataConfig, root: str
) -> list[_ShardTask]:
    """Every shard's images in order (each split shuffled, seeded): the same for every run."""
    tasks = []
    for n, split in enumerate(SPLITS):
        order = np.random.default_rng([cfg.seed, n]).permutation(parts[split])
        for index, start in enumerate(range(0, len(order), cfg.shard_samples)):
            chunk = order[start : start + cfg.shard_samples]
            tasks.append(_ShardTask(root, split, index, tuple(refs[int(i)] for i in chunk),
                                    cfg.image_mode, dict(cfg.storage_options)))  # fmt: skip
    return tasks


@dataclass
class _Totals:
    """Every shard's results added up (the listing's box counts included), per split where the
    manifest wants them so."""

    splits: dict[str, list[ShardInfo]]
    objects: dict[str, Counter[str]]
    empty: dict[str, int]
    counts: BoxCounts
    skipped: list[tuple[str, str]]

    @classmethod
    def of(cls, results: list[_ShardResult], listing: DetectionListing) -> _Totals:
        counts = BoxCounts()
        counts += listing.counts
        totals = cls(
            {s: [] for s in SPLITS},
            {s: Counter() for s in SPLITS},
            dict.fromkeys(SPLITS, 0),
            counts,
            [],
        )
        for r in results:
            if r.shard is not None:
                totals.splits[r.task.split].append(r.shard)
            totals.objects[r.task.split].update(r.objects)
            totals.empty[r.task.split] += r.empty_images
            totals.counts += r.counts
            totals.skipped += r.skipped
        return totals


def _manifest(results: list[_ShardResult], listing: DetectionListing, cfg: DataConfig,
              fingerprint: str) -> ShardManifest:  # fmt: skip
    """The dataset's manifest from every shard's result, once some image and box are usable."""
    totals = _Totals.of(results, listing)
    _refuse_unusable(totals, listing, cfg)
    class_counts = {
        s: {str(k): c.get(str(k), 0) for k in range(1, len(listing.categories) + 1)}
        for s, c in totals.objects.items()
    }
    columns = {"image": "bytes", "boxes": "bytes", "labels": "ints", "image_id": "int",
               "source": "str", "width": "int", "height": "int"}  # fmt: skip
    return ShardManifest(
        totals.splits,
        class_counts,
        columns,
        meta=_detection_meta(totals, listing, cfg),
        provenance=_detection_provenance(totals, listing, cfg, fingerprint),
    )


def _refuse_unusable(totals: _Totals, listing: DetectionListing, cfg: DataConfig) -> None:
    """A DataError when no image can be read, or no box is left after the checks."""
    skipped = totals.skipped
    where = listing.annotation_files[0] if listing.annotation_files else cfg.source
    if len(skipped) == len(listing.refs):
        raise DataError(
            f"data error: {cfg.source}: none of its {len(skipped)} images can be read "
            f"(e.g. {skipped[0][0]}: {skipped[0][1]})"
        )
    if totals.counts.kept == 0:
        why = totals.counts.summary() or "the annotations hold no boxes"
        raise DataError(f"data error: {where}: no usable box is left ({why})")


def _detection_meta(totals: _Totals, listing: DetectionListing, cfg: DataConfig) -> dict[str, Any]:
    """What a detector needs to know: categories, image mode, objects and empty images a split."""
    categories = listing.categories
    return {
        "kind": "detection",
        "categories": categories.to_json(),
        "classes": list(categories.names),
        "image_mode": cfg.image_mode,
        "annotation_format": listing.format,
        "objects": {s: sum(c.values()) for s, c in totals.objects.items()},
        "empty_images": totals.empty,
    }


def _detection_provenance(
    totals: _Totals, listing: DetectionListing, cfg: DataConfig, fingerprint: str
) -> dict[str, Any]:
    """Where the images came from, which were skipped, what the box checks did, the fingerprint."""
    skipped = totals.skipped
    return {
        "source": cfg.source,
        "num_listed": len(listing.refs),
        "num_skipped": len(skipped),
        "skipped": [list(s) for s in skipped[:SKIPPED_SHOWN]],
        "boxes": totals.counts.to_json(),
        "fingerprint": fingerprint,
    }


def _log_built(cfg: DataConfig, manifest: ShardManifest, listed: int, started: float) -> None:
    prov = manifest.provenance
    counts = BoxCounts(prov["boxes"]["kept"], prov["boxes"]["clipped"],
                       Counter(prov["boxes"]["dropped"]), dict(prov["boxes"]["examples"]))  # fmt: skip
    problems = counts.summary()
    if prov["num_skipped"]:
        first = prov["skipped"][0]
        problems = "; ".join(
            p for p in (f"{prov['num_skipped']} image(s) skipped (e.g. {first[0]}: {first[1]})",
                        problems) if p
        )  # fmt: skip
    if problems:
        log.warning("%s: %s", cfg.source, problems)
    log.info(
        "%s: %d images, %d boxes, %d categories (%s) -> version %s in %.1f s",
        cfg.source, listed - prov["num_skipped"], counts.kept, len(manifest.meta["classes"]),
        manifest.meta["annotation_format"], manifest.version, time.perf_counter() - started,
    )  # fmt: skip


# -- plan, convert, merge (kubetrain.data.fanout) -------------------------------------------------
DETECTION_LISTING = "detection.parquet"  # every image's file, boxes and labels
DETECTION_PLAN = "detection-plan.json"  # format, categories, what the listing dropped


@dataclass
class DetectionPlan:
    """What the plan fixes before any image is decoded: the listing (images, boxes, labels,
    categories), the split, and from them every shard's images (``_shard_tasks``, seeded);
    ``record`` holds the shards as slots and each convert task's range of them."""

    listing: DetectionListing
    parts: dict[str, np.ndarray]
    record: PreprocessPlan

    def save(self, directory: str | Path) -> None:
        """Write the listing, the split and the rest of the plan into ``directory`` (the record
        is the caller's: ``kubetrain.core.artifacts.PlanArtifact``)."""
        import pyarrow as pa

        from kubetrain.data.fanout import save_plan_files

        refs = self.listing.refs
        columns = {
            "url": [r.image.url for r in refs],
            "offset": pa.array([r.image.offset for r in refs], pa.int64()),
            "size": pa.array([r.image.size for r in refs], pa.int64()),
            "member": [r.image.member for r in refs],
            "boxes": [np.asarray(r.boxes, np.float64).reshape(-1).tolist() for r in refs],
            "labels": [np.asarray(r.labels, np.int64).tolist() for r in refs],
            "index": pa.array([r.index for r in refs], pa.int64()),
            "normalized": [bool(r.normalized) for r in refs],
            "source": [r.source for r in refs],
        }
        rest = {
            "format": self.listing.format,
            "categories": self.listing.categories.to_json(),
            "counts": self.listing.counts.to_json(),
            "fingerprint": self.listing.fingerprint,
            "annotation_files": self.listing.annotation_files,
        }
        save_plan_files(directory, (DETECTION_LISTING, columns), self.parts, (DETECTION_PLAN, rest))

    @classmethod
    def load(cls, directory: str | Path, record: PreprocessPlan) -> DetectionPlan:
        """The plan saved in ``directory``; raises DataError if it is not one."""
        from kubetrain.data.fanout import load_plan_files

        table, parts, rest = load_plan_files(
            directory, DETECTION_LISTING, DETECTION_PLAN, "a detection plan"
        )
        columns = ("url", "offset", "size", "member", "boxes", "labels", "index", "normalized",
                   "source")  # fmt: skip
        refs = []
        for url, offset, size, member, boxes, labels, index, normalized, source in zip(
            *(table[c] for c in columns), strict=True
        ):
            image = ImageRef(url, None, int(offset), int(size), member)
            box_array = np.asarray(boxes, np.float64).reshape(-1, 4)
            refs.append(DetectionRef(image, box_array, np.asarray(labels, np.int64), int(index),
                                     bool(normalized), source))  # fmt: skip
        counts = rest["counts"]
        listing = DetectionListing(
            rest["format"], refs, Categories.from_json(rest["categories"]),
            BoxCounts(counts["kept"], counts["clipped"], Counter(counts["dropped"]),
                      dict(counts["examples"])),
            rest["fingerprint"], list(rest["annotation_files"]),
        )  # fmt: skip
        return cls(listing, parts, record)


def plan_detection_shards(
    cfg: DataConfig, num_tasks: int, listing: DetectionListing | None = None
) -> DetectionPlan:
    """Plan the sharded detection dataset of ``cfg`` for ``num_tasks`` convert tasks: list the
    source (unless ``listing`` is given), draw the split, fix every shard's images and cut the
    shards into contiguous ranges of about equal size.

    Raises:
        DataError, ConfigError: as ``build_detection_dataset``.
    """
    from kubetrain.data.fanout import assign_ranges, slots_of

    _refuse_image_size(cfg)
    if listing is None:
        listing = list_detection(cfg.source, cfg.annotation_format, dict(cfg.storage_options),
                                 max(4, cfg.num_workers * 2))  # fmt: skip
    parts = split_detection(listing, cfg)
    tasks = _shard_tasks(listing.refs, parts, cfg, "")
    slots = slots_of((t.split, t.index, len(t.refs)) for t in tasks)
    record = PreprocessPlan(
        kind="detection",
        source=cfg.source,
        fingerprint=_fingerprint(listing, cfg),
        num_tasks=num_tasks,
        slots=slots,
        ranges=assign_ranges([s.samples for s in slots], num_tasks),
    )
    return DetectionPlan(listing, parts, record)


def convert_detection_shards(
    cfg: DataConfig, plan: DetectionPlan, slots: Sequence[int], root: str
) -> list[SlotResult]:
    """Decode, check the boxes of and write the shards of ``slots`` into ``root`` with
    ``cfg.num_workers`` processes; what each wrote, in order.

    Raises:
        DataError: the store fails (a missing or undecodable image is skipped and counted).
    """
    from kubetrain.data.fanout import shard_record

    tasks = _shard_tasks(plan.listing.refs, plan.parts, cfg, root)
    done = _run([tasks[i] for i in slots], cfg.num_workers, _write_shard)
    out = []
    for i, r in zip(slots, done, strict=True):
        shard = shard_record(r.shard) if r.shard is not None else None
        samples = r.shard.num_samples if r.shard is not None else 0
        out.append(SlotResult(slot=i, shard=shard, samples=samples, class_counts=dict(r.objects),
                              skipped=list(r.skipped), empty_images=r.empty_images,
                              boxes=r.counts.to_json()))  # fmt: skip
    return out


def merge_detection_shards(
    cfg: DataConfig, plan: DetectionPlan, results: Sequence[SlotResult], root: str
) -> ShardManifest:
    """The manifest of every slot's shard at ``root`` (written last; objects, empty images and
    the box checks' counts summed from the slots in slot order); a previous build's shards there
    are removed.

    Raises:
        DataError: no image can be read, or no box is left.
    """
    from kubetrain.data.fanout import shard_info

    options = dict(cfg.storage_options)
    tasks = _shard_tasks(plan.listing.refs, plan.parts, cfg, root)
    written = []
    for r in results:
        b = r.boxes or {"kept": 0, "clipped": 0, "dropped": {}, "examples": {}}
        counts = BoxCounts(b["kept"], b["clipped"], Counter(b["dropped"]), dict(b["examples"]))
        written.append(_ShardResult(
            tasks[r.slot], shard_info(r.shard) if r.shard is not None else None,
            Counter(r.class_counts), r.empty_images, counts,
            [(name, why) for name, why in r.skipped],
        ))  # fmt: skip
    manifest = _manifest(written, plan.listing, cfg, plan.record.fingerprint)
    save_manifest(root, manifest, options)
    _remove_shards(root, [s.path for v in manifest.splits.values() for s in v], options)
    return manifest
