"""Sharded dataset storage: Parquet shards per split plus one manifest, on any fsspec filesystem.

A dataset larger than memory is written as a sequence of shards (``<split>-000000.parquet``,
...), each small enough to hold in one worker's memory, and a ``shards.json`` manifest that
lists every shard with its sample count, bytes and SHA-256, the per-class counts of each split,
and a content version (a digest over the shards' digests, so changing one sample changes it).

Records are flat dicts of columns: ``bytes`` (an encoded image), ``int``/``float`` scalars (a
label), or 1-D integer arrays (token ids, stored as Parquet lists of the narrowest integer type
that holds them). Readers get numpy arrays back. Writing is atomic per shard and for the
manifest: a reader never sees a half-written shard, and a manifest only names finished shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import posixpath
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kubetrain.core.errors import DataError

MANIFEST = "shards.json"
FORMAT = "kubetrain-shards/1"


@dataclass(frozen=True)
class ShardInfo:
    """One shard file of a split: where it is (relative to the dataset root) and what it holds."""

    path: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class ShardManifest:
    """Every split's shards, per-class counts and the content version of a sharded dataset."""

    splits: dict[str, list[ShardInfo]]
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    # What a reader needs beyond the records (an image set's class names, colour mode, size);
    # part of the content: it enters the version when present.
    meta: dict[str, Any] = field(default_factory=dict)
    # Where the data came from (source, input fingerprint, what was skipped): recorded, but not
    # content, so not part of the version (the same images from another bucket, same version).
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        """A digest of every shard's digest, in split and shard order (and of ``meta`` when
        there is one): the content version."""
        h = hashlib.sha256()
        for split in sorted(self.splits):
            for shard in self.splits[split]:
                h.update(f"{split}/{shard.path}:{shard.sha256}\n".encode())
        if self.meta:
            h.update(json.dumps(self.meta, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def num_samples(self, split: str) -> int:
        """Samples in ``split`` (0 if it has none)."""
        return sum(s.num_samples for s in self.splits.get(split, []))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "columns": self.columns,
            "class_counts": self.class_counts,
            "splits": {k: [asdict(s) for s in v] for k, v in self.splits.items()},
            **({"meta": self.meta} if self.meta else {}),
            **({"provenance": self.provenance} if self.provenance else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = MANIFEST) -> ShardManifest:
        """Parse a manifest; raises DataError naming ``where`` if it is not one."""
        if data.get("format") != FORMAT:
            raise DataError(f"{where}: not a kubetrain shard manifest (format {FORMAT!r})")
        try:
            splits = {k: [ShardInfo(**s) for s in v] for k, v in data["splits"].items()}
        except (KeyError, TypeError) as err:
            raise DataError(f"{where}: malformed shard manifest ({err})") from None
        return cls(
            splits,
            dict(data.get("class_counts", {})),
            dict(data.get("columns", {})),
            meta=dict(data.get("meta", {})),
            provenance=dict(data.get("provenance", {})),
        )


def _filesystem(root: str, storage_options: Mapping[str, Any] | None):
    import fsspec

    fs, path = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
    return fs, path.rstrip("/")


def _column_kind(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return "bytes"
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        return "ints"
    if isinstance(value, bool | np.bool_):
        raise DataError("boolean columns are not supported in shards; store an int")
    if isinstance(value, int | np.integer):
        return "int"
    if isinstance(value, float | np.floating):
        return "float"
    if isinstance(value, str):
        return "str"
    raise DataError(f"cannot store a {type(value).__name__} in a shard column")


def _narrow_int_type(arrays: list[np.ndarray]):
    import pyarrow as pa

    hi = max((int(a.max()) for a in arrays if a.size), default=0)
    lo = min((int(a.min()) for a in arrays if a.size), default=0)
    for np_type, pa_type in ((np.uint16, pa.uint16()), (np.int32, pa.int32())):
        info = np.iinfo(np_type)
        if info.min <= lo and hi <= info.max:
            return pa_type
    return pa.int64()


class ShardWriter:
    """Writes records of one split into shards of at most ``max_samples`` samples or
    ``max_bytes`` bytes of payload, whichever comes first, and collects them for the manifest.

    Use as a context manager (or call ``close``); then ``shards`` lists what was written.
    """

    def __init__(
        self,
        root: str,
        split: str,
        max_samples: int = 4096,
        max_bytes: int = 64 << 20,
        storage_options: Mapping[str, Any] | None = None,
        label_column: str | None = "label",
        first_index: int = 0,
    ) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        self.fs, self.root = _filesystem(root, storage_options)
        self.split, self.max_samples, self.max_bytes = split, max_samples, max_bytes
        self.label_column = label_column
        self.columns: dict[str, str] = {}
        self.shards: list[ShardInfo] = []
        # Where this writer's shard numbering starts: parallel writers of one split each take
        # their own range (``<split>-<first_index + k>``).
        self.first_index = first_index
        self.class_counts: Counter[str] = Counter()
        self._pending: list[dict[str, Any]] = []
        self._pending_bytes = 0
        self.fs.makedirs(self.root, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        """Add one record; all records of a split must have the same columns and kinds."""
        kinds = {k: _column_kind(v) for k, v in record.items()}
        if not self.columns:
            self.columns = kinds
        elif kinds != self.columns:
            raise DataError(
                f"shard record columns {sorted(kinds.items())} differ from the split's "
                f"{sorted(self.columns.items())}"
            )
        self._pending.append(dict(record))
        self._pending_bytes += sum(
            len(v) if kinds[k] == "bytes" else getattr(v, "nbytes", 8) for k, v in record.items()
        )
        if self.label_column is not None and self.label_column in record:
            self.class_counts[str(record[self.label_column])] += 1
        if len(self._pending) >= self.max_samples or self._pending_bytes >= self.max_bytes:
            self.flush()

    def write_all(self, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            self.write(record)

    def flush(self) -> None:
        """Write the pending records as one shard (nothing if there are none)."""
        if not self._pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = {}
        for name, kind in self.columns.items():
            values = [r[name] for r in self._pending]
            if kind == "bytes":
                arrays[name] = pa.array([bytes(v) for v in values], type=pa.binary())
            elif kind == "ints":
                # One flat array plus offsets: converting each row's array on its own costs
                # more than tokenizing it (and makes pyarrow import pandas).
                item = _narrow_int_type(values)
                flat = np.concatenate([np.asarray(v) for v in values])
                offsets = np.zeros(len(values) + 1, dtype=np.int32)
                np.cumsum([len(v) for v in values], out=offsets[1:])
                arrays[name] = pa.ListArray.from_arrays(
                    pa.array(offsets), pa.array(flat, type=item)
                )
            else:
                arrays[name] = pa.array(values)
        buf = io.BytesIO()
        pq.write_table(pa.table(arrays), buf, compression="zstd")
        data = buf.getvalue()
        name = f"{self.split}-{self.first_index + len(self.shards):06d}.parquet"
        final = posixpath.join(self.root, name)
        tmp = posixpath.join(self.root, f".{name}.tmp")
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, final)
        except OSError as err:  # a full disk, a read-only or vanished directory: name the file
            from pathlib import Path

            from kubetrain.core.io import write_error

            with contextlib.suppress(OSError):
                self.fs.rm(tmp)
            raise write_error(Path(final), err) from None
        self.shards.append(
            ShardInfo(name, len(self._pending), len(data), hashlib.sha256(data).hexdigest())
        )
        self._pending, self._pending_bytes = [], 0

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()


def write_manifest(
    root: str, writers: Iterable[ShardWriter], storage_options: Mapping[str, Any] | None = None
) -> ShardManifest:
    """Write ``shards.json`` for the finished ``writers`` (one per split) and return it."""
    writers = list(writers)
    columns: dict[str, str] = {}
    for w in writers:
        if columns and w.columns and w.columns != columns:
            raise DataError(f"split {w.split!r} has columns {w.columns}, others {columns}")
        columns = columns or w.columns
    manifest = ShardManifest(
        splits={w.split: list(w.shards) for w in writers},
        class_counts={w.split: dict(sorted(w.class_counts.items())) for w in writers},
        columns=columns,
    )
    save_manifest(root, manifest, storage_options)
    return manifest


def save_manifest(
    root: str, manifest: ShardManifest, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Write ``manifest`` as ``root/shards.json`` atomically (for shards written elsewhere,
    e.g. by parallel workers; ``write_manifest`` covers the one-writer-per-split case)."""
    fs, path = _filesystem(root, storage_options)
    tmp = posixpath.join(path, f".{MANIFEST}.tmp")
    with fs.open(tmp, "w") as f:
        json.dump(manifest.to_json(), f, indent=2)
    fs.mv(tmp, posixpath.join(path, MANIFEST))


def read_manifest(root: str, storage_options: Mapping[str, Any] | None = None) -> ShardManifest:
    """The manifest of the sharded dataset at ``root``; raises DataError if there is none."""
    fs, path = _filesystem(root, storage_options)
    where = posixpath.join(root.rstrip("/"), MANIFEST)
    try:
        with fs.open(posixpath.join(path, MANIFEST)) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{where}: no shard manifest (not a sharded dataset)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{where}: unreadable shard manifest ({err})") from None
    return ShardManifest.from_json(data, where)


def read_shard(
    root: str, shard: ShardInfo, storage_options: Mapping[str, Any] | None = None
) -> dict[str, list[Any]]:
    """One shard's columns as lists (``bytes`` values, numpy arrays for integer lists, scalars).

    Raises DataError if the shard is missing, unreadable, or not the shard the manifest names
    (its digest differs): a stale or corrupted shard is never read silently.
    """
    import pyarrow.parquet as pq

    fs, path = _filesystem(root, storage_options)
    where = posixpath.join(root.rstrip("/"), shard.path)
    try:
        with fs.open(posixpath.join(path, shard.path), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{where}: shard listed in {MANIFEST} is missing") from None
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        raise DataError(f"{where}: content differs from {MANIFEST} (changed or corrupted shard)")
    # No Arrow thread pool: a process that started one aborted at exit about half the time
    # ("terminate called without an active exception", apache/arrow#34314), after its work,
    # so a step that had written its outputs could still fail. A shard decodes in one thread;
    # the ranks and loader workers are the parallelism.
    table = pq.read_table(io.BytesIO(data), use_threads=False)
    out: dict[str, list[Any]] = {}
    for name in table.column_names:
        col = table.column(name)
        if str(col.type).startswith("list"):
            # Copies, so a record kept in a shuffle buffer does not pin the whole shard.
            out[name] = [np.array(v) for v in col.to_numpy(zero_copy_only=False)]
        else:
            out[name] = col.to_pylist()
    return out
