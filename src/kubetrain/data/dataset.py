"""The dataset artifact: split, normalised arrays plus everything needed to use them again.

Layout of an artifact directory::

    data.npz    x_train y_train x_val y_val x_test y_test (float32 features, int64 class ids)
    meta.json   version, source, classes, input shape, normalisation statistics, split sizes
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from math import ceil
from pathlib import Path
from typing import Any

import numpy as np

from kubetrain.config import DataConfig
from kubetrain.data.sources import RawData, load_source
from kubetrain.errors import DataError
from kubetrain.io import atomic_write, read_json, write_json

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass
class DatasetArtifact:
    """A loaded dataset artifact: ``arrays['x_train']`` etc. and its ``meta``."""

    path: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def input_shape(self) -> list[int]:
        return self.meta["input_shape"]

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.arrays[f"x_{name}"], self.arrays[f"y_{name}"]


def encode_labels(y: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Map labels (strings or numbers) to class ids 0..K-1; the class names keep their order."""
    classes, ids = np.unique(y.astype(str) if y.dtype.kind in "OUS" else y, return_inverse=True)
    names = [str(c.item()) if hasattr(c, "item") else str(c) for c in classes]
    if y.dtype.kind == "f":
        names = [str(int(float(n))) if float(n).is_integer() else n for n in names]
    return ids.astype(np.int64), names


def split_indices(y: np.ndarray, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Stratified, seeded train/val/test split of sample indices (scikit-learn's
    ``train_test_split(stratify=...)`` twice: the same indices, see ``stratified_split``)."""
    idx = np.arange(len(y))
    counts = np.bincount(y)
    if counts.min() < 3:
        rare = int(np.argmin(counts))
        raise DataError(
            f"data error: class id {rare} has {counts.min()} sample(s); a stratified "
            "train/val/test split needs at least 3 per class"
        )
    held_out = cfg.val_fraction + cfg.test_fraction
    try:
        train, rest = stratified_split(idx, y, held_out, cfg.seed)
        val, test = stratified_split(rest, y[rest], cfg.test_fraction / held_out, cfg.seed)
    except ValueError as err:
        raise DataError(f"data error: cannot split {len(y)} samples: {err}") from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def stratified_split(
    idx: np.ndarray, y: np.ndarray, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.model_selection.train_test_split(idx, test_size=test_size, stratify=y,
    random_state=seed)``, order included: the same per-class counts, tie-breaks and draws from
    the same ``RandomState`` stream, without importing scikit-learn (1.7 s on a small CPU) into
    the preprocess step. A test compares the two over many sizes, fractions and seeds."""
    n = len(y)
    n_test = ceil(test_size * n)
    n_train = n - n_test
    classes, y_ids, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    if not 0 < test_size < 1 or n_train == 0:
        raise ValueError(f"a held-out fraction of {test_size} leaves no training samples")
    if class_counts.min() < 2:
        raise ValueError("a class has only 1 member; stratification needs at least 2")
    for part, size in (("train", n_train), ("test", n_test)):
        if size < len(classes):
            raise ValueError(
                f"the {part} part ({size} samples) is smaller than the number of classes "
                f"({len(classes)})"
            )
    by_class = np.split(np.argsort(y_ids, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train, test = [], []
    for i, members in enumerate(by_class):
        perm = members.take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(perm[: n_i[i]])
        test.extend(perm[n_i[i] : n_i[i] + t_i[i]])
    # Shuffled as scikit-learn does: the order is what a second split of ``test`` starts from.
    return idx[rng.permutation(train).astype(np.int64)], idx[rng.permutation(test).astype(np.int64)]


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState):
    """scikit-learn's ``_approximate_mode``: per-class draws proportional to the counts, the
    remainder to the largest fractional parts, ties broken at random."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add = min(len(inds), need)
            floored[rng.choice(inds, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def fit_normalizer(x_train: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (shift, scale) fitted on the training split: x_norm = (x - shift) / scale."""
    features = x_train.shape[1]
    if kind == "standard":
        shift, scale = x_train.mean(axis=0), x_train.std(axis=0)
    elif kind == "minmax":
        shift, scale = x_train.min(axis=0), x_train.max(axis=0) - x_train.min(axis=0)
    else:
        shift, scale = np.zeros(features), np.ones(features)
    scale = np.where(scale < 1e-8, 1.0, scale)  # constant features (digit borders) stay finite
    return shift.astype(np.float32), scale.astype(np.float32)


def build_dataset(cfg: DataConfig, out_dir: str | Path) -> DatasetArtifact:
    """Read the source, clean, split, normalise and write the artifact to ``out_dir``."""
    started = time.perf_counter()
    raw: RawData = load_source(cfg)
    y, classes = encode_labels(raw.y)
    if len(classes) < 2:
        raise DataError(f"data error: {raw.source}: needs at least 2 classes, found {len(classes)}")
    parts = split_indices(y, cfg)
    shift, scale = fit_normalizer(raw.x[parts["train"]], cfg.normalize)
    arrays: dict[str, np.ndarray] = {}
    for name in SPLITS:
        arrays[f"x_{name}"] = ((raw.x[parts[name]] - shift) / scale).astype(np.float32)
        arrays[f"y_{name}"] = y[parts[name]]
    version = _fingerprint(arrays, cfg)
    meta = {
        "format_version": FORMAT_VERSION,
        "version": version,
        "source": raw.source,
        "files": raw.files,
        "classes": classes,
        "input_shape": raw.image_shape or [int(raw.x.shape[1])],
        "num_features": int(raw.x.shape[1]),
        "sizes": {name: len(parts[name]) for name in SPLITS},
        "class_counts": np.bincount(y, minlength=len(classes)).tolist(),
        "normalization": {"kind": cfg.normalize, "shift": shift.tolist(), "scale": scale.tolist()},
        "config": cfg.model_dump(mode="json"),
        "preprocess_seconds": round(time.perf_counter() - started, 4),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "data.npz", lambda tmp: _save_npz(tmp, arrays))
    write_json(out / "meta.json", meta)  # written last: its presence marks a complete artifact
    return DatasetArtifact(path=out, meta=meta, arrays=arrays)


def _save_npz(tmp: str, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _fingerprint(arrays: dict[str, np.ndarray], cfg: DataConfig) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    h.update(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    return h.hexdigest()[:16]


def load_dataset(path: str | Path) -> DatasetArtifact:
    """Load an artifact written by ``build_dataset``; raises DataError if it is not one."""
    path = Path(path)
    if not (path / "meta.json").is_file() or not (path / "data.npz").is_file():
        raise DataError(f"data error: {path}: not a kubetrain dataset (no meta.json/data.npz)")
    try:
        meta = read_json(path / "meta.json")
    except ValueError as err:  # a damaged artifact: one line, not a traceback
        raise DataError(f"data error: {path / 'meta.json'}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise DataError(f"data error: {path}: dataset format {version} unknown")
    import zipfile

    try:
        with np.load(path / "data.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data error: {path / 'data.npz'}: unreadable ({first})") from None
    return DatasetArtifact(path=path, meta=meta, arrays=arrays)
