"""Building the dataset artifact: read, clean, split, normalise (``kubetrain.core.artifacts``
defines the artifact itself: ``DatasetArtifact``, its files and its loader)."""

from __future__ import annotations

import hashlib
import json
import time
from math import ceil
from pathlib import Path

import numpy as np

from kubetrain.core.artifacts import SPLITS, DatasetArtifact, load_dataset
from kubetrain.core.errors import DataError
from kubetrain.core.records import Normalization, TabularMeta
from kubetrain.data.config import DataConfig
from kubetrain.data.sources import RawData, load_source

__all__ = ["DatasetArtifact", "build_dataset", "load_dataset"]


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
    the same ``RandomState`` stream, without importing scikit-learn (seconds of import time) into
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
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
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
    """Read the source, clean, split, normalise and write the artifact to ``out_dir``.

    Raises:
        DataError: the source cannot be read, has one class, or cannot be split.
    """
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
    version = _dataset_version(arrays, cfg)
    meta = TabularMeta(
        version=version,
        source=raw.source,
        files=raw.files,
        classes=classes,
        input_shape=raw.image_shape or [int(raw.x.shape[1])],
        num_features=int(raw.x.shape[1]),
        sizes={name: len(parts[name]) for name in SPLITS},
        class_counts=np.bincount(y, minlength=len(classes)).tolist(),
        normalization=Normalization(kind=cfg.normalize, shift=shift.tolist(), scale=scale.tolist()),
        notes=raw.notes,
        config=cfg.model_dump(mode="json"),
        preprocess_seconds=round(time.perf_counter() - started, 4),
    )
    artifact = DatasetArtifact(path=Path(out_dir), meta=meta, arrays=arrays)
    artifact.save(out_dir)
    return artifact


def _dataset_version(arrays: dict[str, np.ndarray], cfg: DataConfig) -> str:
    """16 hex digits of the arrays and the data config (less how preprocess was spread over
    tasks, which does not change the table): the dataset's version."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    settings = cfg.model_dump(mode="json", exclude=set(cfg.RUN_ONLY_FIELDS))
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]
