"""Object detection (``data.task: detection``): box-annotated images through every step.

- preprocess (:func:`build`): a COCO, Pascal VOC or YOLO source (or the built-in
  ``fashion-mnist-scenes``) checked and written as shards by
  ``kubetrain.data.detection.build_detection_dataset``; ``meta.json`` goes last.
- training: each rank streams its share of the shards (``kubetrain.data.streaming``) through
  ``data.num_workers`` loader workers that decode and apply the box transforms
  (``kubetrain.data.box_transforms``); a batch is ``((images,), targets)``: a list of 0-1 float
  images (sizes may differ) and a list of ``{"boxes", "labels", "image_id"}``, as torchvision's
  detectors take them. The loss is the model's own: the sum of the dict it returns in training
  mode; each component is logged per epoch (``forward_loss``).
- validation: the val split streamed in rank parts; the loss with the model in training mode
  (batch norms kept in eval mode, no gradients, the RNG left as it was: proposals are sampled),
  then the predictions in eval mode, gathered and scored by COCO's evaluator: ``val_map``
  (AP@[.5:.95]) is the primary metric and the search objective.
- ``score``: COCO's figures (``kubetrain.tasks.coco``) on a whole split, images/s of the
  forward passes, the same figures for a detector that only guesses (``guesses``: training box
  sizes and class frequencies at random places), and up to ``MAX_EXAMPLES`` test images drawn with their ground truth beside
  the predictions (with scores), the images with the most errors first.
- ``examples``: images padded to one size in one tensor (a detector takes a batch tensor as a
  list), with their box counts: latency batches and quantize's calibration.

Needs torchvision and pycocotools (the ``vision`` extra).
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from kubetrain.core.errors import ConfigError, DataError
from kubetrain.core.records import (
    DatasetPart,
    DetectionMeta,
    DetectionSpec,
    NetworkSpec,
    PreprocessPlan,
    SlotResult,
)
from kubetrain.tasks.base import Batch, BatchPlan, Scores, Task
from kubetrain.tasks.images import BUILTIN_SOURCES, cache_dir, require_torchvision
from kubetrain.tasks.stream import StreamBatches

if TYPE_CHECKING:
    from kubetrain.core.artifacts import DatasetArtifact
    from kubetrain.core.distributed import DistContext
    from kubetrain.data.config import DataConfig
    from kubetrain.data.shards import ShardManifest
    from kubetrain.models.config import ModelConfig
    from kubetrain.tasks.config import TaskConfig

log = logging.getLogger(__name__)

SCENES_SOURCE = "fashion-mnist-scenes"
DEFAULT_SCENES = 1000  # scenes of the built-in source when data.limit is not set
EVAL_BATCH = 16
MAX_EXAMPLES = 24  # test images drawn in the report
SCORE_THRESHOLD = 0.5  # detections drawn, and counted as false positives per image
GUESS_FROM = 2000  # training images the guessing baseline takes its box sizes and classes from


def _source_folder(cfg: DataConfig) -> str:
    """``data.source``, with the built-in scenes written (once) as a COCO folder."""
    if cfg.source == SCENES_SOURCE:
        from kubetrain.data.scenes import scenes_folder

        return str(scenes_folder(cache_dir(), cfg.limit or DEFAULT_SCENES, cfg.seed))
    return cfg.source


def preflight(cfg: DataConfig) -> None:
    """What ``kubetrain run`` checks before anything is written: torchvision and pycocotools
    import, the source exists, the transforms build (that the model is a detector is
    ``kubetrain.models.text.check_model_for_task``'s).

    Raises:
        ConfigError: a missing library, a transform that does not build, data.image_size.
        DataError: the source does not exist.
    """
    from kubetrain.data.box_transforms import BoxTransform, check_box_transforms
    from kubetrain.tasks.coco import _pycocotools

    require_torchvision()
    _pycocotools()
    data = cfg
    if data.source in BUILTIN_SOURCES:
        raise ConfigError(
            f"config error: data.source: {data.source!r} is a classification set; detection's "
            f"built-in source is {SCENES_SOURCE!r}"
        )
    if data.image_size is not None:
        raise ConfigError(
            "config error: data.image_size: detection stores images at their size; resize in "
            "data.transforms or with the detector's min_size/max_size (model.kwargs)"
        )
    if data.source == SCENES_SOURCE:
        from kubetrain.data.idx import fashion_mnist_files

        fashion_mnist_files("train")
    else:
        from kubetrain.data.detection import annotation_format

        annotation_format(data.source, data.annotation_format, data.storage_options)
    check_box_transforms(
        BoxTransform(data.transforms.train, "data.transforms.train"),
        BoxTransform(data.transforms.eval, "data.transforms.eval"),
    )


def build(cfg: DataConfig, out_dir: str | Path) -> DetectionMeta:
    """Preprocess: the detection dataset of ``cfg`` as shards in ``out_dir``, then
    ``meta.json``.

    Returns:
        The meta (``DetectionMeta``): ``version``, ``source``,
        ``classes``, ``categories`` (``[{id, name}]``: labels ``1..K`` are their order),
        ``input_shape`` (``[3]``: images vary in size), ``image_mode``, ``annotation_format``,
        ``sizes`` (images per split), ``class_counts`` (objects per split and class name),
        ``objects`` and ``empty_images`` per split, ``boxes`` (kept, clipped, dropped),
        ``num_skipped``, ``config``, ``preprocess_seconds``.

    Raises:
        ConfigError: no torchvision, or data.image_size set.
        DataError: see ``build_detection_dataset``.
    """
    from kubetrain.core.artifacts import DATASET_META
    from kubetrain.data.detection import build_detection_dataset

    require_torchvision()
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / DATASET_META).unlink(missing_ok=True)
    manifest = build_detection_dataset(_listed(cfg), str(out))
    return _write_meta(cfg, manifest, out, None, time.perf_counter() - started)


def _listed(cfg: DataConfig) -> DataConfig:
    """``cfg`` with the built-in scenes' source replaced by the COCO folder they are written to
    (once per machine)."""
    return cfg.model_copy(update={"source": _source_folder(cfg)})


def _write_meta(
    cfg: DataConfig,
    manifest: ShardManifest,
    out: Path,
    root: str | None,
    seconds: float,
    tasks: int = 1,
) -> DetectionMeta:
    """``meta.json`` of the detection dataset whose manifest is ``manifest`` (at ``root``, or in
    ``out``), written last: it marks the artifact complete."""
    from kubetrain.core.artifacts import DatasetArtifact

    classes = list(manifest.meta["classes"])
    meta = DetectionMeta(
        version=manifest.version,
        source=cfg.source,
        classes=classes,
        categories=manifest.meta["categories"],
        input_shape=[3],
        image_mode=manifest.meta["image_mode"],
        annotation_format=manifest.meta["annotation_format"],
        sizes={s: manifest.num_samples(s) for s in ("train", "val", "test")},
        class_counts={
            split: {classes[int(k) - 1]: v for k, v in counts.items()}
            for split, counts in manifest.class_counts.items()
        },
        objects=manifest.meta["objects"],
        empty_images=manifest.meta["empty_images"],
        boxes=manifest.provenance["boxes"],
        num_skipped=manifest.provenance.get("num_skipped", 0),
        config=cfg.model_dump(mode="json"),
        preprocess_seconds=round(seconds, 3),
        preprocess_tasks=tasks,
        root=root,
    )
    DatasetArtifact.write_meta(out, meta)  # last: marks the artifact complete
    return meta


# -- preprocess fanned out over tasks: plan, convert, merge (kubetrain.data.fanout) --------------
def plan(cfg: DataConfig, plan_dir: Path, num_tasks: int) -> PreprocessPlan:
    """The plan task: list the source and its annotations, split it, fix the shards
    (``plan_dir`` gets the listing; the caller writes the record).

    Raises:
        ConfigError, DataError: as ``build``.
    """
    from kubetrain.data.detection import plan_detection_shards

    require_torchvision()
    planned = plan_detection_shards(_listed(cfg), num_tasks)
    planned.save(plan_dir)
    return planned.record.model_copy(update={"source": cfg.source})


def convert(
    cfg: DataConfig, plan_dir: Path, planned: PreprocessPlan, task: int, root: str
) -> DatasetPart:
    """A convert task: decode, check the boxes of and write its range of shards into ``root``.

    Raises:
        DataError: the store fails, or the plan is unreadable.
    """
    from kubetrain.data.detection import DetectionPlan, convert_detection_shards
    from kubetrain.data.fanout import convert_part

    def run(slots: list[int]) -> list[SlotResult]:
        listed = _listed(cfg)  # the built-in scenes: written once per machine, like the plan's
        detection_plan = DetectionPlan.load(plan_dir, planned)
        return convert_detection_shards(listed, detection_plan, slots, root)

    return convert_part(planned, task, max(1, cfg.num_workers), run)


def merge(
    cfg: DataConfig,
    plan_dir: Path,
    planned: PreprocessPlan,
    results: list[SlotResult],
    parts: list[DatasetPart],
    root: str,
    out: Path,
) -> DetectionMeta:
    """The merge task: the manifest of the shards at ``root`` (every range checked complete by
    the caller; objects and box counts summed from the parts), then ``meta.json`` in ``out``.

    Raises:
        DataError: no image can be read, or no box is left.
    """
    from kubetrain.data.detection import DetectionPlan, merge_detection_shards

    started = time.perf_counter()
    detection_plan = DetectionPlan.load(plan_dir, planned)
    manifest = merge_detection_shards(_listed(cfg), detection_plan, results, root)
    stored = None if root == str(out) else root
    seconds = planned.seconds + sum(p.seconds for p in parts) + time.perf_counter() - started
    return _write_meta(cfg, manifest, out, stored, seconds, tasks=planned.num_tasks)


class _EvalMode:
    """Within it the model computes its training losses without changing: no gradients, batch
    norms and dropout in eval mode (running statistics untouched), the global RNG restored."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was = self.model.training
        self.rng = contextlib.ExitStack()
        self.rng.enter_context(torch.random.fork_rng(devices=[]))
        self.rng.enter_context(torch.no_grad())
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
                m.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was)
        self.rng.close()


def loss_dict(model: nn.Module, images: list[torch.Tensor], targets: list[dict]) -> dict:
    """``model(images, targets)`` in training mode: the dict of loss tensors.

    Raises:
        ConfigError: the model returned something else (a user's factory that does not take
            targets as torchvision's detectors do).
    """
    try:
        out = model(images, targets)
    except TypeError as err:  # a forward that takes no targets (a classifier)
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(
            f"config error: model.name: the model does not take model(images, targets) and "
            f"return a dict of loss tensors, as torchvision's detectors do (TypeError: {first})"
        ) from None
    if not isinstance(out, dict) or not out or not all(torch.is_tensor(v) for v in out.values()):
        raise ConfigError(
            f"config error: model.name: in training mode the detector returned a "
            f"{type(out).__name__}; it must return a dict of loss tensors for "
            "model(images, targets), as torchvision's detectors do"
        )
    return out


def _predictions(out: Any) -> list[dict[str, torch.Tensor]]:
    if not isinstance(out, (list, tuple)) or not all(
        isinstance(o, dict) and {"boxes", "labels", "scores"} <= set(o) for o in out
    ):
        raise ConfigError(
            "config error: model.name: in eval mode the detector must return a list of "
            "{'boxes', 'labels', 'scores'} per image, as torchvision's detectors do"
        )
    return list(out)


class DetectionTask(Task):
    """Box-annotated images streamed from shards; the detector's own losses; COCO mAP."""

    kind = "detection"
    metric = "map"

    def __init__(self, cfg: TaskConfig, data: DatasetArtifact) -> None:
        from kubetrain.data.box_transforms import BoxTransform, check_box_transforms
        from kubetrain.data.boxes import Categories

        require_torchvision()
        super().__init__(cfg, data)
        self.options = dict(cfg.data.storage_options)
        self.meta = data.meta_of(DetectionMeta)
        self.categories = Categories.from_json(self.meta.categories)
        self.train_transform = BoxTransform(cfg.data.transforms.train, "data.transforms.train")
        self.eval_transform = BoxTransform(cfg.data.transforms.eval, "data.transforms.eval")
        check_box_transforms(self.train_transform, self.eval_transform)
        self._manifest: ShardManifest | None = None

    @property
    def manifest(self) -> ShardManifest:
        if self._manifest is None:
            from kubetrain.data.shards import read_manifest

            self._manifest = read_manifest(self.data.root, self.options)
        return self._manifest

    def _stream(self, split: str, batch: int, transform, **kwargs: Any):
        from kubetrain.data.box_transforms import collate_detection
        from kubetrain.data.streaming import StreamingDataset

        return StreamingDataset(
            self.data.root, split, batch, transform=transform, collate=collate_detection,
            storage_options=self.options, manifest=self.manifest, **kwargs,
        )  # fmt: skip

    # -- the model ---------------------------------------------------------------------------
    def model_spec(self, model: ModelConfig) -> NetworkSpec:
        return NetworkSpec(
            config=model.model_dump(mode="json"),
            input_shape=[3],
            num_classes=len(self.categories) + 1,
            detection=DetectionSpec(
                classes=list(self.categories.names), categories=self.categories.to_json()
            ),
        )

    def build_model(self, model: ModelConfig) -> nn.Module:
        from kubetrain.models.detection import build_detector

        return build_detector(model, list(self.categories.names), self.options)

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        if device.type == "cpu":
            return batch
        (images,), targets = batch
        moved = [i.to(device, non_blocking=True) for i in images]
        return (moved,), [
            {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
            for t in targets
        ]

    # -- training ----------------------------------------------------------------------------
    def train_batches(self, tc: BatchPlan, ctx: DistContext) -> StreamBatches:
        accum = tc.grad_accum_steps
        micro = tc.batch_size // (ctx.world_size * accum)
        if micro < 1:
            raise ConfigError(
                f"config error: train.batch_size {tc.batch_size} is less than one image per "
                f"process and accumulation step ({ctx.world_size} x {accum})"
            )
        dataset = self._stream(
            "train", micro, self.train_transform, rank=ctx.rank, world_size=ctx.world_size,
            num_workers=self.cfg.data.num_workers, seed=tc.seed,
        )  # fmt: skip
        return StreamBatches(dataset, accum, self.cfg.data.num_workers, self.cfg.data.prefetch)

    def forward_loss(self, net: nn.Module, inputs, target, label_smoothing: float = 0.0):
        """The sum of the detector's losses, and each of them (detached); a detector's
        classification loss is its own (``train.label_smoothing`` does not reach it)."""
        if label_smoothing:
            raise ConfigError(
                "config error: train.label_smoothing: does not apply to detection (the "
                "detector computes its own classification loss); leave it at 0"
            )
        parts = loss_dict(net, inputs[0], target)
        loss = sum(v.float() for v in parts.values())
        return loss, {k: v.detach().float() for k, v in parts.items()}

    def validate(self, model: nn.Module, ctx: DistContext) -> tuple[float, float]:
        """Mean loss and COCO mAP of the val split, each rank taking its part of it (a
        collective: the predictions are gathered and scored on every rank alike)."""
        from kubetrain.core.distributed import all_reduce_sum, gather_objects

        stream = self._stream("val", EVAL_BATCH, self.eval_transform, rank=ctx.rank,
                              world_size=ctx.world_size, shuffle=False)  # fmt: skip
        loss_sum, count = 0.0, 0.0
        truth: list[dict[str, Any]] = []
        detections: list[dict[str, Any]] = []
        was_training = model.training
        for images, targets in stream:
            (images,), targets = self.to_device(((images,), targets), ctx.device)
            with _EvalMode(model):
                parts = loss_dict(model, images, targets)
            loss_sum += float(sum(v.float() for v in parts.values())) * len(images)
            count += len(images)
            model.eval()
            with torch.no_grad():
                out = _predictions(model(images))
            truth += self._truth(images, targets)
            detections += self._detections(targets, out)
        model.train(was_training)
        loss_sum, count = all_reduce_sum([loss_sum, count], ctx)
        if not count:
            raise DataError(f"data error: {self.data.root}: the val split has no images")
        truth = [t for part in gather_objects(truth, ctx) for t in part]
        detections = [d for part in gather_objects(detections, ctx) for d in part]
        values = self._coco(truth, detections)
        return loss_sum / count, values["map"]

    # -- COCO --------------------------------------------------------------------------------
    def _truth(self, images: list[torch.Tensor], targets: list[dict]) -> list[dict[str, Any]]:
        """Ground truth as the evaluator takes it (in the eval-transformed image's pixels)."""
        return [
            {"id": int(t["image_id"]), "height": int(img.shape[-2]), "width": int(img.shape[-1]),
             "boxes": t["boxes"].cpu().numpy(),
             "category_ids": self.categories.ids_of(t["labels"].cpu().numpy())}
            for img, t in zip(images, targets, strict=True)
        ]  # fmt: skip

    def _detections(self, targets: list[dict], out: list[dict]) -> list[dict[str, Any]]:
        from kubetrain.tasks.coco import results

        entries = []
        for t, o in zip(targets, out, strict=True):
            labels = o["labels"].cpu().numpy().astype(np.int64)
            valid = (labels >= 1) & (labels <= len(self.categories))
            entries += results(
                int(t["image_id"]), o["boxes"].detach().float().cpu().numpy()[valid],
                o["scores"].detach().float().cpu().numpy()[valid],
                self.categories.ids_of(labels[valid]),
            )  # fmt: skip
        return entries

    def _coco(self, truth: list[dict], detections: list[dict]) -> dict[str, Any]:
        from kubetrain.tasks.coco import coco_scores, ground_truth

        names = dict(zip(self.categories.ids, self.categories.names, strict=True))
        dataset = ground_truth(truth, self.categories.to_json())
        return coco_scores(dataset, detections, names, SCORE_THRESHOLD)

    def guesses(self, truth: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
        """The detections of a detector that only guesses, for the same images: per image as
        many boxes as a training image has on average (at least one), each with the size of a
        random training box, at a random place, of a class drawn by the training split's class
        frequencies, with a random score. What a bar on mAP must be far above."""
        from kubetrain.tasks.coco import results

        rng = np.random.default_rng(seed)
        sizes, labels, images = [], [], 0
        for record in self._records("train"):
            boxes = np.frombuffer(record["boxes"], dtype=np.float32).reshape(-1, 4)
            sizes.append(boxes[:, 2:] - boxes[:, :2])
            labels.append(np.asarray(record["labels"], dtype=np.int64))
            images += 1
            if images >= GUESS_FROM:
                break
        wh = np.concatenate(sizes) if sizes else np.zeros((0, 2))
        classes = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        if not len(wh):
            return []
        per_image = max(1, round(len(wh) / max(images, 1)))
        out = []
        for img in truth:
            pick = rng.integers(len(wh), size=per_image)
            w, h = wh[pick, 0], wh[pick, 1]
            x = rng.uniform(0, np.maximum(img["width"] - w, 1))
            y = rng.uniform(0, np.maximum(img["height"] - h, 1))
            boxes = np.stack([x, y, x + w, y + h], axis=1)
            cats = self.categories.ids_of(classes[rng.integers(len(classes), size=per_image)])
            out += results(img["id"], boxes, rng.random(per_image), cats)
        return out

    # -- quantize and evaluate ---------------------------------------------------------------
    @property
    def primary(self) -> str:
        """The evaluation's primary metric: ``evaluate.metric`` when it names a detection
        metric (``map_50``), else COCO mAP (what the quantize gate measures on too)."""
        wanted = getattr(self.scoring, "metric", None)
        return wanted if wanted in ("map", "map_50") else "map"

    def _records(self, split: str) -> Iterator[dict[str, Any]]:
        from kubetrain.data.shards import read_shard

        for shard in self.manifest.splits.get(split, []):
            columns = read_shard(self.data.root, shard, self.options)
            for i in range(shard.num_samples):
                yield {k: v[i] for k, v in columns.items()}

    def _sample_records(self, split: str, n: int, seed: int) -> list[dict[str, Any]]:
        """Up to ``n`` records of ``split`` drawn at random (seeded); only the shards that
        hold them are read."""
        import bisect

        from kubetrain.data.shards import read_shard

        shards = self.manifest.splits.get(split, [])
        starts = list(np.cumsum([0] + [s.num_samples for s in shards]))
        if not starts[-1]:
            raise DataError(f"data error: {self.data.root}: the {split} split has no images")
        chosen = np.random.default_rng(seed).permutation(int(starts[-1]))[:n]
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for k, position in enumerate(chosen.tolist()):
            j = bisect.bisect_right(starts, position) - 1
            by_shard.setdefault(j, []).append((position - int(starts[j]), k))
        out: list[dict[str, Any]] = [{}] * len(chosen)
        for j, rows in sorted(by_shard.items()):
            columns = read_shard(self.data.root, shards[j], self.options)
            for row, k in rows:
                out[k] = {c: v[row] for c, v in columns.items()}
        return out

    def sample_images(self, split: str, n: int, seed: int = 0) -> list[torch.Tensor]:
        """Up to ``n`` images of ``split`` drawn at random (seeded), eval-transformed, as a
        list (their own sizes): quantize's calibration."""
        return [self.eval_transform(r)[0] for r in self._sample_records(split, n, seed)]

    def examples(self, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``n`` images of ``split`` (seeded), zero-padded to the largest in one
        ``(n, 3, H, W)`` tensor, and their box counts."""
        records = self._sample_records(split, n, seed)
        images = [self.eval_transform(r)[0] for r in records]
        h = max(i.shape[-2] for i in images)
        w = max(i.shape[-1] for i in images)
        batch = torch.zeros(len(images), 3, h, w)
        for k, img in enumerate(images):
            batch[k, :, : img.shape[-2], : img.shape[-1]] = img
        return batch, torch.tensor([len(r["labels"]) for r in records])

    def score(self, model: nn.Module, split: str) -> Scores:
        """COCO's figures of ``model`` (fp32 or int8, eval mode) on ``split``; ``seconds`` is
        forward time only, so images/s compares models; examples: the images with the most
        errors (missed boxes + confident false detections at IoU .5) first."""
        truth, detections, kept = [], [], {}
        seconds = 0.0
        model.eval()
        batch: list[dict[str, Any]] = []

        def run(records: list[dict[str, Any]]) -> None:
            nonlocal seconds
            pairs = [self.eval_transform(r) for r in records]
            images, targets = [p[0] for p in pairs], [p[1] for p in pairs]
            started = time.perf_counter()
            with torch.no_grad():  # not inference_mode: inductor freezing fails under it
                out = _predictions(model(images))
            seconds += time.perf_counter() - started
            truth.extend(self._truth(images, targets))
            detections.extend(self._detections(targets, out))
            for r, t, o in zip(records, targets, out, strict=True):
                kept[int(t["image_id"])] = (r, t, {k: v.detach().cpu() for k, v in o.items()})

        for record in self._records(split):
            batch.append(record)
            if len(batch) == EVAL_BATCH:
                run(batch)
                batch = []
        if batch:
            run(batch)
        if not truth:
            raise DataError(f"data error: {self.data.root}: the {split} split has no images")
        values = self._coco(truth, detections)
        per_image = values.pop("per_image")
        values["images_per_second"] = len(truth) / seconds if seconds else None
        guess = self._coco(truth, self.guesses(truth))
        values["guess_baseline_map"] = guess.get("map", 0.0)
        values["guess_baseline_map_50"] = guess.get("map_50", 0.0)
        worst = sorted(
            per_image, key=lambda i: (-(per_image[i]["missed"] + per_image[i]["false"]), i)
        )
        examples = [self._example(*kept[i], per_image[i]) for i in worst[:MAX_EXAMPLES]]
        return Scores(self.primary, values, examples, samples=len(truth), seconds=seconds)

    def _example(self, record, target, out, errors) -> dict[str, Any]:
        """One test image drawn twice, ground truth beside the confident predictions."""
        names = [self.categories.name(int(v)) for v in target["labels"]]
        labels = out["labels"]
        keep = (out["scores"] >= SCORE_THRESHOLD) & (labels >= 1) & (labels <= len(self.categories))
        predicted = [(self.categories.name(int(v)), float(s))
                     for v, s in zip(labels[keep], out["scores"][keep], strict=True)]  # fmt: skip
        return {
            "image": draw_pair(
                record["image"], target["boxes"], names, out["boxes"][keep], predicted
            ),
            "source": str(record.get("source", record["image_id"])),
            "true": ", ".join(names) or "(no object)",
            "predicted": ", ".join(f"{n} {s:.2f}" for n, s in predicted) or "(none)",
            "missed": errors["missed"],
            "false": errors["false"],
        }


def draw_pair(image: bytes, truth, names, boxes, predicted) -> str:
    """A PNG data URI: the image with its ground truth (green) beside it with the predictions
    (orange, with scores), scaled up to at least 192 px high for a readable grid.

    The boxes are in the eval-transformed image's pixels; an eval list that resizes shows them
    on the stored image scaled to that size."""
    from PIL import Image, ImageDraw

    with Image.open(io.BytesIO(image)) as img:
        base = img.convert("RGB")
    scale = max(1.0, 192 / base.height)
    size = (round(base.width * scale), round(base.height * scale))
    panels = []
    for drawn, labels, colour in ((truth, [(n, None) for n in names], (40, 200, 60)),
                                   (boxes, predicted, (255, 140, 0))):  # fmt: skip
        panel = base.resize(size, Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(panel)
        for box, (name, score) in zip(np.asarray(drawn).reshape(-1, 4), labels, strict=True):
            x1, y1, x2, y2 = (float(v) * scale for v in box)
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
            text = name if score is None else f"{name} {score:.2f}"
            draw.text((x1 + 2, max(0.0, y1 - 11)), text, fill=colour)
        panels.append(panel)
    out = Image.new("RGB", (size[0] * 2 + 4, size[1]), (255, 255, 255))
    out.paste(panels[0], (0, 0))
    out.paste(panels[1], (size[0] + 4, 0))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
