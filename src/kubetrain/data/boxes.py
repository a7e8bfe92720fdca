"""Boxes of object-detection data: checks against the image, category ids to labels and back,
and the split stratified on the classes an image holds.

Pure numpy (no torch): the preprocess workers import it.

Conventions, the same in every output:

- a box is ``[x1, y1, x2, y2]`` in pixels of the stored image, ``x2 > x1`` and ``y2 > y1``
  (torchvision's ``XYXY``; COCO's ``[x, y, w, h]`` is converted on the way in and out);
- a dataset's categories keep their own ids (COCO's ``category_id``, a YOLO class index, a VOC
  name's place in the sorted names); the model sees *labels* ``1..K`` (``0`` is the background
  of torchvision's detectors), the categories in id order; :class:`Categories` maps both ways.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kubetrain.core.errors import DataError

# Why a box or an annotation was left out (the keys of ``BoxCounts.dropped``), as the
# preprocess warning says them.
DROP_REASONS = {
    "degenerate": "zero or negative size (after clipping to the image)",
    "unknown_category": "an unknown category id",
    "missing_image": "an annotation whose image is not listed",
    "crowd": "a crowd region (iscrowd=1)",
    "malformed": "a line or field that does not parse",
}


@dataclass
class BoxCounts:
    """What the checks did to a source's boxes: kept, clipped to the image, dropped (by reason).

    Counts add up over shards and annotation files (``+=``).
    """

    kept: int = 0
    clipped: int = 0
    dropped: Counter = field(default_factory=Counter)
    # The first file (annotation or image) behind each reason, for the warning.
    examples: dict[str, str] = field(default_factory=dict)

    def drop(self, reason: str, where: str, n: int = 1) -> None:
        self.dropped[reason] += n
        self.examples.setdefault(reason, where)

    def __iadd__(self, other: BoxCounts) -> BoxCounts:
        self.kept += other.kept
        self.clipped += other.clipped
        self.dropped.update(other.dropped)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)
        return self

    def to_json(self) -> dict:
        return {"kept": self.kept, "clipped": self.clipped, "dropped": dict(self.dropped),
                "examples": dict(self.examples)}  # fmt: skip

    def summary(self) -> str:
        """One clause per problem found (empty when there was none)."""
        parts = []
        if self.clipped:
            parts.append(f"{self.clipped} box(es) reaching outside the image clipped")
        for reason, n in sorted(self.dropped.items()):
            where = self.examples.get(reason, "")
            parts.append(
                f"{n} dropped: {DROP_REASONS.get(reason, reason)}"
                + (f" (e.g. {where})" if where else "")
            )
        return "; ".join(parts)


def check_boxes(
    boxes: np.ndarray, width: int, height: int, counts: BoxCounts, where: str
) -> np.ndarray:
    """The boxes an image keeps: clipped to ``[0, width] x [0, height]``, those left with zero or
    negative size (or non-finite corners) dropped; both counted in ``counts``.

    Args:
        boxes: ``(N, 4)`` ``x1, y1, x2, y2`` in pixels.
        width, height: the image's size.
        counts: where the clipped and dropped boxes are counted.
        where: the image, named in the warning.

    Returns:
        A boolean mask of the boxes kept; ``boxes`` is clipped in place.
    """
    if not len(boxes):
        return np.zeros(0, dtype=bool)
    finite = np.isfinite(boxes).all(axis=1)
    boxes[~finite] = 0
    clipped = boxes.copy()
    np.clip(clipped[:, 0::2], 0, width, out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0, height, out=clipped[:, 1::2])
    keep = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    moved = keep & (clipped != boxes).any(axis=1)
    counts.clipped += int(moved.sum())
    if (~keep).any():
        counts.drop("degenerate", where, int((~keep).sum()))
    counts.kept += int(keep.sum())
    boxes[:] = clipped
    return keep


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, 2:] += out[:, :2]
    return out


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, 2:] -= out[:, :2]
    return out


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    half = b[:, 2:] / 2
    return np.concatenate([b[:, :2] - half, b[:, :2] + half], axis=1)


@dataclass(frozen=True)
class Categories:
    """A dataset's categories: their own ids and names, in id order; labels are ``1..K``."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[int, str]]) -> Categories:
        """From ``(id, name)`` pairs in any order.

        Raises:
            DataError: two categories share an id, or there are none.
        """
        ordered = sorted((int(i), str(n)) for i, n in pairs)
        ids = [i for i, _ in ordered]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"data error: category id {dup} is defined twice")
        return cls(tuple(ids), tuple(n for _, n in ordered))

    @classmethod
    def from_json(cls, data: Sequence[dict]) -> Categories:
        return cls.from_pairs([(c["id"], c["name"]) for c in data])

    def to_json(self) -> list[dict]:
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names, strict=True)]

    def __len__(self) -> int:
        return len(self.ids)

    def labels(self, ids: np.ndarray) -> np.ndarray:
        """Labels ``1..K`` of category ids; ``0`` for an id that is not a category."""
        table = {c: k + 1 for k, c in enumerate(self.ids)}
        return np.array([table.get(int(i), 0) for i in np.asarray(ids).ravel()], dtype=np.int64)

    def ids_of(self, labels: np.ndarray) -> np.ndarray:
        """The category ids of labels ``1..K`` (what results files and reports name)."""
        table = np.asarray(self.ids, dtype=np.int64)
        return table[np.asarray(labels, dtype=np.int64) - 1]

    def name(self, label: int) -> str:
        return self.names[int(label) - 1]


def strata(label_sets: Sequence[Sequence[int] | np.ndarray], min_count: int = 3) -> np.ndarray:
    """One stratum per image for a stratified split of multi-label data: the rarest class the
    image holds (counted in images), ``0`` for an image without objects.

    Each class's images then spread over the splits in proportion, rare classes first (an image
    with a rare and a common class counts as the rare one's, which the common one can spare).
    A stratum with fewer than ``min_count`` images (a split needs one per part) joins the
    stratum of images without objects, or, if that is still too small, the largest one.
    """
    present: Counter[int] = Counter()
    for labels in label_sets:
        present.update(set(int(x) for x in labels))
    keys = np.array(
        [min(set(int(x) for x in labels), key=lambda c: (present[c], c)) if len(labels) else 0
         for labels in label_sets],
        dtype=np.int64,
    )  # fmt: skip
    sizes = Counter(keys.tolist())
    small = [k for k, n in sizes.items() if n < min_count]
    if small:
        target = 0 if sizes.get(0, 0) + sum(sizes[k] for k in small if k) >= min_count else None
        if target is None:
            target = max(sizes, key=lambda k: (sizes[k], -k))
        for k in small:
            keys[keys == k] = target
    return keys
