"""COCO box mAP by the reference evaluator (``pycocotools``), not by hand.

``coco_scores`` turns ground truth and predictions into what ``pycocotools.cocoeval.COCOeval``
takes (a COCO dataset and a results list: ``[x, y, w, h]`` boxes, the categories' own ids),
runs ``evaluate`` / ``accumulate`` / ``summarize`` and reads its figures back:

- ``map`` (AP@[.5:.95]), ``map_50``, ``map_75``, ``map_small/medium/large``, ``mar_1/10/100``,
  ``mar_small/medium/large``: ``COCOeval.stats`` in its order (a figure COCO cannot compute, e.g.
  AP of small objects where there are none, is left out rather than reported as its -1);
- ``per_class_ap`` and ``per_class_ap50``: AP per category from ``eval["precision"]`` (IoU x
  recall x category x area x max-detections), averaged over the entries COCO fills (> -1), as
  its ``summarize`` averages them; ``None`` for a category with no ground truth;
- ``pr_curves``: per category, precision at COCO's 101 recall points at IoU .5 (all areas, 100
  detections): the report's precision-recall curves;
- ``per_image``: per image, the ground-truth boxes missed and the detections (score >=
  ``score_threshold``) that match none at IoU .5, from COCO's own matching (``evalImgs``).

Box "area" is the box's own (there are no masks), which decides the size buckets. COCOeval
prints; its output is swallowed.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from kubetrain.core.errors import ConfigError

STATS = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)  # fmt: skip
EVALUATOR_HINT = (
    "detection metrics need pycocotools (the vision extra: pip install 'kubetrain[vision]')"
)


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:
        raise ConfigError(f"config error: evaluate: {EVALUATOR_HINT} ({err})") from None
    return COCO, COCOeval


def ground_truth(
    images: Sequence[dict[str, Any]], categories: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """A COCO dataset of ``images``: each ``{"id", "width", "height", "boxes": (N, 4) x1 y1 x2
    y2, "category_ids": (N,)}``; ``categories``: ``[{"id", "name"}]``."""
    out_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for img in images:
        out_images.append({"id": int(img["id"]), "width": int(img["width"]),
                           "height": int(img["height"])})  # fmt: skip
        boxes = np.asarray(img["boxes"], dtype=np.float64).reshape(-1, 4)
        for box, cat in zip(boxes, np.asarray(img["category_ids"]).ravel(), strict=True):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({
                "id": len(annotations) + 1, "image_id": int(img["id"]), "category_id": int(cat),
                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0,
            })  # fmt: skip
    return {"images": out_images, "annotations": annotations,
            "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in categories]}  # fmt: skip


def results(image_id: int, boxes: np.ndarray, scores: np.ndarray, category_ids: np.ndarray):
    """One image's detections as COCO results entries (``bbox`` as ``[x, y, w, h]``)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return [
        {"image_id": int(image_id), "category_id": int(c), "score": float(s),
         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
        for b, s, c in zip(boxes, np.asarray(scores).ravel(), np.asarray(category_ids).ravel(),
                           strict=True)
    ]  # fmt: skip


def run_cocoeval(dataset: dict[str, Any], detections: list[dict[str, Any]]):
    """``COCOeval`` (bbox) of ``detections`` against ``dataset``, evaluated and accumulated;
    None when there are no detections (``loadRes`` refuses an empty list)."""
    COCO, COCOeval = _pycocotools()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        if not detections:
            return None
        dt = gt.loadRes([dict(d) for d in detections])  # it writes into the entries
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def coco_scores(
    dataset: dict[str, Any],
    detections: list[dict[str, Any]],
    names: dict[int, str],
    score_threshold: float = 0.5,
) -> dict[str, Any]:
    """COCO's figures for ``detections`` on ``dataset`` (see the module docstring).

    Args:
        dataset: a COCO dataset (``ground_truth``).
        detections: COCO results entries (``results``).
        names: category id -> name (the keys of the per-class figures).
        score_threshold: which detections count as predicted in ``per_image``.

    Returns:
        The figures; all zero (and ``per_image`` counting every box as missed) when there are
        no detections.
    """
    ev = run_cocoeval(dataset, detections)
    image_ids = [int(i["id"]) for i in dataset["images"]]
    if ev is None:
        missed = {i: 0 for i in image_ids}
        for a in dataset["annotations"]:
            missed[int(a["image_id"])] += 1
        values: dict[str, Any] = dict.fromkeys(STATS, 0.0)
        values.update(per_class_ap=dict.fromkeys(names.values(), 0.0),
                      per_class_ap50=dict.fromkeys(names.values(), 0.0), pr_curves={},
                      per_image={i: {"missed": m, "false": 0} for i, m in missed.items()})  # fmt: skip
        return values
    values = {k: float(v) for k, v in zip(STATS, ev.stats, strict=True) if v > -1}
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    per_class, per_class50, curves = {}, {}, {}
    for k, cat in enumerate(ev.params.catIds):
        name = names.get(int(cat), str(cat))
        per_class[name] = _mean_valid(precision[:, :, k, 0, -1])
        per_class50[name] = _mean_valid(precision[0, :, k, 0, -1])
        curve = precision[0, :, k, 0, -1]
        if (curve > -1).any():
            curves[name] = [round(float(max(p, 0.0)), 4) for p in curve]
    values.update(per_class_ap=per_class, per_class_ap50=per_class50, pr_curves=curves,
                  per_image=_per_image(ev, image_ids, score_threshold))  # fmt: skip
    return values


def _per_image(ev, image_ids: list[int], threshold: float) -> dict[int, dict[str, int]]:
    """Missed ground truth and unmatched confident detections per image at IoU .5 (all areas),
    from COCO's matching (``evalImgs``: per category, area range and image)."""
    out = {i: {"missed": 0, "false": 0} for i in image_ids}
    area_all = ev.params.areaRng[0]
    for entry in ev.evalImgs:
        if entry is None or entry["aRng"] != area_all:
            continue
        counts = out[int(entry["image_id"])]
        ignored = np.asarray(entry["gtIgnore"], dtype=bool)
        matched = np.asarray(entry["gtMatches"])[0] > 0 if len(ignored) else np.zeros(0, bool)
        counts["missed"] += int((~matched & ~ignored).sum())
        scores = np.asarray(entry["dtScores"])
        dt_matched = np.asarray(entry["dtMatches"])[0] > 0 if len(scores) else np.zeros(0, bool)
        counts["false"] += int(((scores >= threshold) & ~dt_matched).sum())
    return out
