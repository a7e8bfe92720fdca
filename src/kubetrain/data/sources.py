"""Read raw samples from the bundled digits or from CSV/Parquet/NPZ files (local or fsspec URIs)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kubetrain.config import DataConfig
from kubetrain.errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = (".csv", ".parquet", ".npz")


@dataclass
class RawData:
    """Features ``x`` (N, F) float32, labels ``y`` (N,) as read, and the image shape if any."""

    x: np.ndarray
    y: np.ndarray
    image_shape: list[int] | None
    source: str
    files: list[str]


def load_source(cfg: DataConfig) -> RawData:
    """Load every sample ``cfg.source`` names; raises DataError naming the file on bad input."""
    if cfg.source == "digits":
        x, y = load_digits()
        return RawData(x=x, y=y, image_shape=[1, 8, 8], source="digits", files=[])
    files = _expand(cfg.source)
    workers = max(1, min(cfg.num_workers, len(files)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(lambda f: _read_file(f, cfg.label_column), files))
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    x, y = _drop_missing(x, y, cfg.source)
    image_shape = cfg.image_shape
    if image_shape is not None and int(np.prod(image_shape)) != x.shape[1]:
        raise DataError(
            f"data error: data.image_shape {image_shape} has {int(np.prod(image_shape))} values "
            f"but {cfg.source} has {x.shape[1]} feature columns"
        )
    return RawData(x=x, y=y, image_shape=image_shape, source=cfg.source, files=files)


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


def _expand(source: str) -> list[str]:
    import fsspec

    try:
        fs, _, paths = fsspec.get_fs_token_paths(source)
    except (ValueError, ImportError) as err:
        raise DataError(f"data error: {source}: cannot open ({err})") from None
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    files = sorted(prefix + p for p in paths if fs.isfile(p))
    if not files:
        raise DataError(f"data error: {source}: no such file")
    for f in files:
        if not f.lower().endswith(SUFFIXES):
            raise DataError(f"data error: {f}: unsupported file type (use {', '.join(SUFFIXES)})")
    return files


def _read_file(path: str, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    import fsspec

    lower = path.lower()
    with fsspec.open(path, "rb") as f:
        if lower.endswith(".npz"):
            return _read_npz(f, path)
        import pandas as pd

        try:
            frame = pd.read_parquet(f) if lower.endswith(".parquet") else pd.read_csv(f)
        except pd.errors.EmptyDataError:
            raise DataError(f"data error: {path}: the file is empty") from None
        except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as err:
            raise DataError(
                f"data error: {path}: cannot parse ({str(err).splitlines()[0]})"
            ) from None
    return _split_frame(frame, path, label_column)


def _split_frame(frame, path: str, label_column: str) -> tuple[np.ndarray, np.ndarray]:
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
    return features.to_numpy(dtype=np.float32, na_value=np.nan), labels


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
    return x.reshape(x.shape[0], -1).astype(np.float32), y


def _drop_missing(x: np.ndarray, y: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Cleaning: drop rows with a missing feature or label, and say how many."""
    import pandas as pd

    bad = np.isnan(x).any(axis=1) | pd.isna(y)
    if bad.all():
        raise DataError(f"data error: {source}: every row has a missing value")
    if bad.any():
        log.warning("dropped %d of %d rows with missing values from %s", bad.sum(), len(y), source)
    return x[~bad], y[~bad]
