"""Where images come from: an image-folder tree, a CSV/Parquet manifest, or WebDataset-style tar
shards, on a local path or any fsspec URI (``s3://``, ``gs://``, ...).

Listing reads no pixels: it yields one :class:`ImageRef` per image (where its bytes are and its
label as written) and a fingerprint of the inputs (names, sizes, ETags or mtimes) from the
listing alone, which lets a rebuild on unchanged input be skipped without reading the images.
Tar shards are the exception: their members are only known by reading the tar headers, so each
tar is read once, in parallel, and a member is later fetched by byte range.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import tarfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from kubetrain.core.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# The members of a WebDataset sample that carry its label (a class name or index, as text).
LABEL_EXTENSIONS = ("cls", "label")

SourceKind = Literal["folder", "manifest", "tars"]


@dataclass(frozen=True)
class ImageRef:
    """One image: the URL of the file that holds it, its byte range inside that file for a tar
    member (``offset`` -1: the whole file) and its label as the source writes it."""

    url: str
    label: Any
    offset: int = -1
    size: int = -1
    member: str = ""

    @property
    def name(self) -> str:
        """How messages name the image: its path, or ``tar::member``."""
        return f"{self.url}::{self.member}" if self.member else self.url


@dataclass
class ImageListing:
    """Every image a source names, and a digest of what the listing saw (the cache key)."""

    kind: SourceKind
    refs: list[ImageRef]
    fingerprint: str


def source_kind(source: str) -> SourceKind:
    """Which kind of image source ``source`` names, from its name alone."""
    name = source.rstrip("/").lower()
    if name.endswith(TAR_SUFFIXES):
        return "tars"
    if name.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    return "folder"


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order: ``{000..127}`` (a zero-padded numeric
    range, as wide as its first bound), ``{a,b,c}`` (alternatives); several groups multiply.

    Raises:
        ConfigError: a brace is not closed, or a range runs backwards.
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ConfigError(f"config error: data.source: {pattern!r} has a '}}' without '{{'")
        return [pattern]
    end = pattern.find("}", start)
    if end < 0:
        raise ConfigError(f"config error: data.source: {pattern!r} has a '{{' without '}}'")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo:
            raise ConfigError(f"config error: data.source: range {{{body}}} runs backwards")
        width = len(rng.group(1))
        options = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [head + option + rest for option in options for rest in expand_braces(tail)]


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """``(fs, path)`` for ``url``; the storage options apply to remote URLs only (a local path
    next to an ``s3://`` source must not get its endpoint)."""
    import fsspec

    protocol = fsspec.core.split_protocol(url)[0] or "file"
    options = dict(storage_options or {}) if protocol not in ("file", "local") else {}
    return fsspec.core.url_to_fs(url, **options)


def _url(fs, path: str) -> str:
    """A listed path as the URL a worker opens: plain for local files, with protocol else."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def read_bytes(ref: ImageRef, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of one image (a byte range for a tar member)."""
    fs, path = filesystem(ref.url, storage_options)
    if ref.offset < 0:
        return fs.cat_file(path)
    return fs.cat_file(path, start=ref.offset, end=ref.offset + ref.size)


def list_images(
    source: str,
    *,
    label_column: str = "label",
    image_column: str = "image",
    storage_options: Mapping[str, Any] | None = None,
    num_threads: int = 8,
) -> ImageListing:
    """Every image ``source`` names, with its label, and a fingerprint of the listing.

    Args:
        source: an image-folder root, a ``.csv``/``.parquet`` manifest, or tar shards (a brace
            pattern such as ``train-{000000..000127}.tar``); a local path or an fsspec URI.
        label_column, image_column: the manifest's columns (label; image path or URI).
        storage_options: fsspec options for remote URLs (endpoint, credentials).
        num_threads: parallel requests when listing needs one per file (manifests, tars).

    Returns:
        The refs in a fixed order (sorted paths; manifest row order; tar and member order).

    Raises:
        DataError: the source is missing, a class folder has no images, a manifest lacks a
            column or has an empty cell, a tar sample has no label.
        ConfigError: a malformed brace pattern.
    """
    kind = source_kind(source)
    if kind == "tars":
        return _list_tars(source, storage_options, num_threads)
    if kind == "manifest":
        return _list_manifest(source, label_column, image_column, storage_options, num_threads)
    return _list_folder(source, storage_options)


def _stamp(info: Mapping[str, Any]) -> str:
    """What says a file changed, from its listing entry: size and ETag/mtime/checksum."""
    for key in ("ETag", "etag", "md5Hash", "crc32c", "mtime", "LastModified", "last_modified"):
        if info.get(key) is not None:
            return f"{info.get('size')}:{info[key]}"
    return f"{info.get('size')}"


def _digest(kind: str, entries: list[str]) -> str:
    h = hashlib.sha256(kind.encode())
    for entry in entries:
        h.update(entry.encode() + b"\n")
    return h.hexdigest()[:16]


def _list_folder(source: str, storage_options: Mapping[str, Any] | None) -> ImageListing:
    fs, root = filesystem(source, storage_options)
    root = root.rstrip("/")
    if not fs.isdir(root):
        from kubetrain.data.storage import not_found

        what = not_found(source, storage_options, "not found") if not fs.exists(root) else (
            "not a folder of class folders")  # fmt: skip
        raise DataError(f"data error: {source}: {what}")
    classes = sorted(
        posixpath.basename(e["name"].rstrip("/"))
        for e in fs.ls(root, detail=True)
        if e["type"] == "directory"
        and not posixpath.basename(e["name"].rstrip("/")).startswith(".")
    )
    if not classes:
        raise DataError(
            f"data error: {source}: no class folders (an image folder has one subfolder per "
            "class, holding that class's images)"
        )
    found = fs.find(root, detail=True)
    per_class: dict[str, list[tuple[str, str]]] = {c: [] for c in classes}
    for path in sorted(found):
        rel = path[len(root) + 1 :]
        parts = rel.split("/")
        if len(parts) < 2 or any(p.startswith(".") for p in parts):
            continue  # files beside the class folders, hidden files: not samples
        if parts[0] in per_class and rel.lower().endswith(IMAGE_SUFFIXES):
            per_class[parts[0]].append((path, _stamp(found[path])))
    for name, files in per_class.items():
        if not files:
            raise DataError(
                f"data error: {source.rstrip('/')}/{name}: class folder has no images "
                f"({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}, any case)"
            )
    refs, entries = [], []
    for name in classes:
        for path, stamp in per_class[name]:
            refs.append(ImageRef(_url(fs, path), name))
            entries.append(f"{path[len(root) + 1 :]}|{stamp}")
    return ImageListing("folder", refs, _digest("folder", entries))


def _list_manifest(
    source: str,
    label_column: str,
    image_column: str,
    storage_options: Mapping[str, Any] | None,
    num_threads: int,
) -> ImageListing:
    import pandas as pd

    fs, path = filesystem(source, storage_options)
    try:
        with fs.open(path, "rb") as f:
            if source.lower().endswith(".csv"):
                table = pd.read_csv(f, dtype={image_column: str})
            else:
                table = pd.read_parquet(f)
    except FileNotFoundError:
        raise DataError(f"data error: {source}: not found") from None
    except (ValueError, OSError) as err:
        raise DataError(f"data error: {source}: unreadable manifest ({err})") from None
    for column, field in ((image_column, "data.image_column"), (label_column, "data.label_column")):
        if column not in table.columns:
            raise DataError(
                f"data error: {source}: no column {column!r} ({field}); it has "
                f"{', '.join(map(str, table.columns))}"
            )
    for column in (image_column, label_column):
        empty = table[column].isna() | (table[column].astype(str).str.strip() == "")
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise DataError(f"data error: {source}: row {row + 1}: empty {column!r}")
    base = _url(fs, posixpath.dirname(path))
    urls = [_resolve(str(p).strip(), base) for p in table[image_column]]

    def stamp(url: str) -> str:
        try:
            ufs, upath = filesystem(url, storage_options)
            return _stamp(ufs.info(upath))
        except (FileNotFoundError, OSError):
            return "missing"  # counted when its bytes cannot be read

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        stamps = list(pool.map(stamp, urls))
    labels = table[label_column].tolist()
    refs = [ImageRef(url, label) for url, label in zip(urls, labels, strict=True)]
    entries = [_stamp(fs.info(path))]
    entries += [f"{u}|{lab}|{s}" for u, lab, s in zip(urls, labels, stamps, strict=True)]
    return ImageListing("manifest", refs, _digest("manifest", entries))


def _resolve(value: str, base: str) -> str:
    """A manifest's image path as a URL: URIs and absolute paths as they are, the rest relative
    to the manifest's folder."""
    if "://" in value or value.startswith("/"):
        return value
    return posixpath.join(base, value)


def _list_tars(
    source: str, storage_options: Mapping[str, Any] | None, num_threads: int
) -> ImageListing:
    urls = expand_braces(source)
    with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(urls)))) as pool:
        listed = list(pool.map(lambda u: _list_tar(u, storage_options), urls))
    refs = [ref for tar_refs, _ in listed for ref in tar_refs]
    entries = [f"{u}|{stamp}" for u, (_, stamp) in zip(urls, listed, strict=True)]
    if not refs:
        raise DataError(f"data error: {source}: the tar shards hold no images")
    return ImageListing("tars", refs, _digest("tars", entries))


def _list_tar(url: str, storage_options: Mapping[str, Any] | None) -> tuple[list[ImageRef], str]:
    """One tar's samples (WebDataset layout: members ``<key>.<ext>`` grouped by key, an image
    and a ``.cls``/``.label`` text member each), read in one sequential pass."""
    fs, path = filesystem(url, storage_options)
    try:
        stamp = _stamp(fs.info(path))
        images: dict[str, tuple[str, int, int]] = {}
        labels: dict[str, str] = {}
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            compressed = not url.lower().endswith(".tar")
            for member in _members(tar):
                key, _, ext = _split_key(member.name)
                member_file = tar.extractfile(member)
                if ext.lower() in LABEL_EXTENSIONS and member_file is not None:
                    labels[key] = member_file.read().decode().strip()
                elif ("." + ext.lower()) in IMAGE_SUFFIXES and key not in images:
                    images[key] = (member.name, member.offset_data, member.size)
    except FileNotFoundError:
        raise DataError(f"data error: {url}: not found") from None
    except tarfile.TarError as err:
        raise DataError(f"data error: {url}: not a readable tar ({err})") from None
    if compressed and images:
        # A member of a compressed tar has no byte range in the file: shards for training are
        # plain tars (as WebDataset writes them).
        raise DataError(f"data error: {url}: compressed tar shards are not supported; use .tar")
    refs = []
    for key, (name, offset, size) in images.items():
        if key not in labels:
            raise DataError(
                f"data error: {url}::{name}: no label member "
                f"({' or '.join(f'{key}.{e}' for e in LABEL_EXTENSIONS)})"
            )
        refs.append(ImageRef(url, labels[key], offset, size, name))
    return refs, stamp


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        if member.isfile():
            yield member


def _split_key(name: str) -> tuple[str, str, str]:
    """WebDataset's sample key: the path up to the first dot of the file name."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem), dot, ext
