"""Read raw samples from the bundled digits or from CSV/Parquet/NPZ files (local or fsspec URIs).

A source of several files (a glob, a folder) is joined by column *name*: every file must have
the same feature columns as the first one, in any order; a missing or extra column is an error
naming the file and the column. Rows with a missing value, or a feature that is not a finite
float32 (``inf``, ``-inf``, beyond float32's range), are dropped with a warning that counts
them: a non-finite value would turn its whole column into NaN after normalisation.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubetrain.core.errors import ConfigError, DataError
from kubetrain.data.config import DataConfig

log = logging.getLogger(__name__)

SUFFIXES = (".csv", ".parquet", ".npz")


@dataclass
class _Part:
    """One file as read: features (named for tabular files, unnamed for .npz) and labels."""

    path: str
    x: np.ndarray
    y: np.ndarray
    columns: list[str] | None


@dataclass
class RawData:
    """Features ``x`` (N, F) float32, labels ``y`` (N,) as read, and the image shape if any."""

    x: np.ndarray
    y: np.ndarray
    image_shape: list[int] | None
    source: str
    files: list[str]
    notes: list[str] = field(default_factory=list)  # rows dropped, per file: said to the user


def load_source(cfg: DataConfig) -> RawData:
    """Load every sample ``cfg.source`` names.

    Args:
        cfg: the data section (``source``, ``label_column``, ``image_shape``, ``num_workers``).

    Returns:
        The features of all files joined by column name, their labels, and the image shape.

    Raises:
        ConfigError: ``data.source`` is empty.
        DataError: a file is missing, unreadable or does not fit the others (the message names
            the file and the column), or no row is left after dropping bad ones.
    """
    if not cfg.source.strip():
        raise ConfigError(
            "config error: data.source: empty; give 'digits' or a path/URI of .csv, .parquet "
            "or .npz files"
        )
    if cfg.source == "digits":
        x, y = load_digits()
        return RawData(x=x, y=y, image_shape=[1, 8, 8], source="digits", files=[])
    from kubetrain.data.storage import storage_errors

    options = dict(cfg.storage_options)
    with storage_errors(cfg.source, options):
        files = _expand(cfg.source, options)
        workers = max(1, min(cfg.num_workers, len(files)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(lambda f: _read_file(f, cfg.label_column, options), files))
    parts = _align_columns(parts)
    kept = [_drop_bad_rows(p) for p in parts]
    x = np.concatenate([k[0] for k in kept])
    y = np.concatenate([k[1] for k in kept])
    notes = [k[2] for k in kept if k[2]]
    if len(y) == 0:
        raise DataError(f"data error: {cfg.source}: every row has a missing or non-finite value")
    image_shape = cfg.image_shape
    if image_shape is not None and int(np.prod(image_shape)) != x.shape[1]:
        raise DataError(
            f"data error: data.image_shape {image_shape} has {int(np.prod(image_shape))} values "
            f"but {cfg.source} has {x.shape[1]} feature columns"
        )
    return RawData(x=x, y=y, image_shape=image_shape, source=cfg.source, files=files, notes=notes)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: features (1797, 64) float32 and labels int64.

    Read from the CSV that scikit-learn ships, as ``sklearn.datasets.load_digits`` does, but
    without importing scikit-learn (2-3 s on a small CPU, paid by every process that loads
    the data); falls back to scikit-learn if the file is not where it ships.
    """
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    for root in (spec.submodule_search_locations or []) if spec else []:
        csv = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            with gzip.open(csv, "rt") as f:
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1].astype(np.float32), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return digits.data.astype(np.float32), digits.target.astype(np.int64)


def _remote_options(path: str, options: dict[str, Any]) -> dict[str, Any]:
    """``data.storage_options`` for a remote URI; none for a local path (they are s3fs's)."""
    return options if "://" in path and not path.startswith("file://") else {}


def _expand(source: str, options: dict[str, Any] | None = None) -> list[str]:
    """The files of ``source``: one file, the matches of a glob, or the data files of a folder."""
    import fsspec

    try:
        fs, _, paths = fsspec.get_fs_token_paths(
            source, storage_options=_remote_options(source, options or {})
        )
    except (ValueError, ImportError) as err:
        raise DataError(f"data error: {source}: cannot open ({err})") from None
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    if len(paths) == 1 and fs.isdir(paths[0]):
        # A folder: its data files (hidden files, such as our own temporaries, are not data).
        inside = [p for p in fs.find(paths[0]) if not p.rsplit("/", 1)[-1].startswith(".")]
        files = sorted(prefix + p for p in inside if p.lower().endswith(SUFFIXES))
        if not files:
            raise DataError(
                f"data error: {source}: a directory with no readable data "
                f"(no {', '.join(SUFFIXES)} files in it)"
            )
        return files
    files = sorted(prefix + p for p in paths if fs.isfile(p))
    if not files:
        from kubetrain.data.storage import not_found

        raise DataError(f"data error: {source}: {not_found(source, options)}")
    for f in files:
        if not f.lower().endswith(SUFFIXES):
            raise DataError(f"data error: {f}: unsupported file type (use {', '.join(SUFFIXES)})")
    return files


def _read_file(path: str, label_column: str, options: dict[str, Any] | None = None) -> _Part:
    import fsspec

    lower = path.lower()
    try:
        with fsspec.open(path, "rb", **_remote_options(path, options or {})) as f:
            if lower.endswith(".npz"):
                x, y = _read_npz(f, path)
                return _Part(path, x, y, None)
            import pandas as pd

            try:
                frame = pd.read_parquet(f) if lower.endswith(".parquet") else pd.read_csv(f)
            except pd.errors.EmptyDataError:
                raise DataError(f"data error: {path}: the file is empty") from None
            except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
                raise DataError(f"data error: {path}: cannot parse ({_first_line(err)})") from None
    except OSError as err:  # permission denied, a vanished file, a failing remote store
        raise DataError(f"data error: {path}: cannot read ({err.strerror or err})") from None
    return _split_frame(frame, path, label_column)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _split_frame(frame, path: str, label_column: str) -> _Part:
    if frame.shape[0] == 0:
        raise DataError(f"data error: {path}: the file has a header but no rows")
    if label_column not in frame.columns:
        shown = ", ".join(map(str, list(frame.columns)[:10]))
        raise DataError(
            f"data error: {path}: no label column '{label_column}' (columns: {shown}); "
            "set data.label_column"
        )
    features = frame.drop(columns=[label_column])
    if features.shape[1] == 0:
        raise DataError(f"data error: {path}: no feature columns besides '{label_column}'")
    bad = [str(c) for c in features.columns if not _is_numeric(features[c])]
    if bad:
        raise DataError(
            f"data error: {path}: non-numeric feature column(s) {', '.join(bad[:5])}"
            f"{' …' if len(bad) > 5 else ''} (only the label may be text)"
        )
    labels = frame[label_column].to_numpy()
    x = _as_float32(features.to_numpy(dtype=np.float64, na_value=np.nan))
    return _Part(path, x, labels, [str(c) for c in features.columns])


def _as_float32(x: np.ndarray) -> np.ndarray:
    """``x`` as float32; a finite value beyond float32's range becomes inf (then dropped)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(np.float32)


def _align_columns(parts: list[_Part]) -> list[_Part]:
    """Put every file's feature columns in the first file's order, matching them by name.

    Raises DataError naming the file and the column when a file lacks a column of the first
    or has one the first lacks, or when unnamed (.npz) and named features are mixed.
    """
    first = parts[0]
    aligned = [first]
    for part in parts[1:]:
        if (first.columns is None) != (part.columns is None):
            named, unnamed = (first, part) if part.columns is None else (part, first)
            raise DataError(
                f"data error: {unnamed.path}: .npz features have no column names and cannot "
                f"be joined with the named columns of {named.path}; use one file type"
            )
        if first.columns is None:
            if part.x.shape[1] != first.x.shape[1]:
                raise DataError(
                    f"data error: {part.path}: x has {part.x.shape[1]} features per row but "
                    f"{first.path} has {first.x.shape[1]}"
                )
            aligned.append(part)
            continue
        assert first.columns is not None and part.columns is not None  # both named here
        missing = [c for c in first.columns if c not in part.columns]
        if missing:
            raise DataError(
                f"data error: {part.path}: missing column '{missing[0]}' (that {first.path} has)"
            )
        extra = [c for c in part.columns if c not in first.columns]
        if extra:
            raise DataError(
                f"data error: {part.path}: extra column '{extra[0]}' (not in {first.path})"
            )
        order = [part.columns.index(c) for c in first.columns]
        aligned.append(_Part(part.path, part.x[:, order], part.y, list(first.columns)))
    return aligned


def _is_numeric(column) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _read_npz(f, path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        arrays = np.load(f, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"data error: {path}: not a readable .npz ({err})") from None
    keys = set(arrays.files)
    if not {"x", "y"} <= keys:
        raise DataError(
            f"data error: {path}: an .npz needs arrays 'x' and 'y' (has {sorted(keys)})"
        )
    x, y = arrays["x"], arrays["y"]
    if x.shape[0] == 0:
        raise DataError(f"data error: {path}: the file is empty")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"data error: {path}: x has {x.shape[0]} rows but y has {y.shape[0]}")
    if x.dtype.kind not in "fiub":
        raise DataError(f"data error: {path}: x must be numeric (is {x.dtype})")
    return _as_float32(x.reshape(x.shape[0], -1)), y


def _drop_bad_rows(part: _Part) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Cleaning: drop rows with a missing label, or a feature that is missing (NaN) or not a
    finite float32 (inf, -inf, beyond float32's range), and say how many of each, per file
    (the line is returned too: None when nothing was dropped)."""
    import pandas as pd

    x, y = part.x, part.y
    missing = np.isnan(x).any(axis=1) | pd.isna(y)
    if y.dtype.kind == "f":
        missing |= np.isinf(y)
    infinite = ~missing & ~np.isfinite(x).all(axis=1)
    bad = missing | infinite
    if bad.any():
        why = []
        if missing.any():
            why.append(f"{int(missing.sum())} with missing values")
        if infinite.any():
            why.append(f"{int(infinite.sum())} with infinite values (inf, or beyond float32)")
        note = f"dropped {int(bad.sum())} of {len(y)} rows from {part.path}: {', '.join(why)}"
        log.warning("%s", note)
        return x[~bad], y[~bad], note
    return x, y, None
