"""The detection task: transforms that move boxes, batches as detectors take them, the
detector's own losses (each logged), training with an exact resume, COCO's figures equal to
pycocotools' own on the source's ids, the examples the report draws, the one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torchvision", reason="the detection task needs the vision extra")
pytest.importorskip("pycocotools", reason="detection's mAP needs the vision extra")

import torch

from detection_data import coco_folder
from kubetrain.core.artifacts import DatasetArtifact
from kubetrain.core.distributed import DistContext
from kubetrain.core.errors import ConfigError
from kubetrain.data.box_transforms import BoxTransform, collate_detection, record_boxes
from kubetrain.pipeline.config import PipelineConfig
from kubetrain.tasks import build_dataset, open_task
from kubetrain.tasks.detection import DetectionTask

pytestmark = pytest.mark.vision

MODEL = {"name": "detection_factory:tiny_detector"}
TRAIN = {"epochs": 2, "batch_size": 4, "lr": 0.003, "optimizer": "adamw", "nproc": 1}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    coco = coco_folder(root, count=40, category_ids=(2, 5, 9))
    out = tmp_path_factory.mktemp("dataset")
    data = {"source": str(root), "task": "detection", "shard_samples": 8}
    from kubetrain.data.config import DataConfig

    meta = build_dataset(DataConfig(**data), out)
    return out, meta, data, coco, root


def task(built, model=None, **data) -> DetectionTask:
    out, _, base, _, _ = built
    cfg = PipelineConfig.model_validate(
        {"data": {**base, **data}, "model": model or MODEL, "train": TRAIN}
    )
    return open_task(cfg, DatasetArtifact.load(out))


def test_meta(built):
    _, meta, _, coco, _ = built
    assert meta.kind == "detection" and meta.input_shape == [3]
    assert [c["id"] for c in meta.categories] == [2, 5, 9]
    assert sum(meta.sizes.values()) == 40
    assert sum(meta.objects.values()) == len(coco["annotations"])


def _record(boxes, size=(40, 60)):
    from kubetrain.data.box_transforms import blank_record

    rec = blank_record(size)
    rec["boxes"] = np.array(boxes, dtype=np.float32).tobytes()
    rec["labels"] = np.arange(1, len(boxes) + 1)
    return rec


def test_a_flip_moves_the_boxes():
    flip = BoxTransform([{"name": "RandomHorizontalFlip", "kwargs": {"p": 1.0}}], "t")
    image, target = flip(_record([[5, 4, 15, 20], [30, 10, 60, 30]]))
    assert image.shape == (3, 40, 60) and image.dtype == torch.float32 and image.max() <= 1
    assert target["boxes"].tolist() == [[45, 4, 55, 20], [0, 10, 30, 30]]
    assert target["labels"].tolist() == [1, 2]


def test_a_crop_drops_the_boxes_it_cuts_away_with_their_labels():
    crop = BoxTransform(
        [{"name": "RandomCrop", "kwargs": {"size": [20, 30]}}], "t"
    )  # SanitizeBoundingBoxes is added
    torch.manual_seed(0)
    kept = set()
    for _ in range(20):
        _, target = crop(_record([[0, 0, 8, 8], [50, 30, 60, 40]]))
        assert len(target["boxes"]) == len(target["labels"])
        assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()
        kept |= set(target["labels"].tolist())
    assert kept  # some crops keep a box


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([{"name": "RandomFlipp"}], r"data.transforms.train\[0\]: unknown transform"),
        ([{"name": "Resize", "kwargs": {"sizes": 3}}], r"data.transforms.train\[0\] \(Resize\)"),
    ],
    ids=["unknown-name", "bad-argument"],
)
def test_bad_transforms_are_one_line(built, specs, message):
    with pytest.raises(ConfigError, match=message):
        task(built, transforms={"train": specs})


def test_batches_are_lists_of_images_and_targets(built):
    w = task(built)
    batches = w.train_batches(w.cfg.train, DistContext())
    batches.set_epoch(0)
    seen = []
    for (images,), targets in batches:
        assert isinstance(images, list) and isinstance(targets, list)
        assert len(images) == len(targets) == 4
        assert all(i.shape[0] == 3 for i in images)
        seen += [t["image_id"] for t in targets]
    assert len(seen) == len(set(seen)) == batches.steps * 4


def test_every_training_image_once_per_epoch_over_ranks_and_workers(built):
    w = task(built, num_workers=2)
    seen = []
    for rank in range(2):
        batches = w.train_batches(w.cfg.train.model_copy(update={"batch_size": 4}),
                                  DistContext(rank=rank, world_size=2))  # fmt: skip
        batches.dataset.batch_size = 1  # every image, none dropped at a step boundary
        batches.set_epoch(1)
        for _images, targets in torch.utils.data.DataLoader(
            batches.dataset, batch_size=None, num_workers=2
        ):
            seen += [t["image_id"] for t in targets]
    assert sorted(seen) == sorted(
        r["image_id"] for r in w._records("train")
    )  # disjoint and complete


@pytest.fixture(scope="module")
def trained(built, tmp_path_factory):
    from kubetrain.train.loop import fit

    w = task(built)
    torch.manual_seed(0)
    return fit(w.cfg, w, DistContext())


def test_training_logs_each_loss_and_validates_on_map(trained):
    for stats in trained.history:
        assert set(stats.loss_components) == {
            "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"
        }  # fmt: skip
        total = sum(stats.loss_components.values())
        assert total == pytest.approx(stats.train_loss, rel=1e-4)
        assert 0 <= stats.val_accuracy <= 1 and np.isfinite(stats.val_loss)
    assert trained.summary.flops_per_sample > 0


def test_validation_leaves_the_model_as_it_was(built, trained):
    w = task(built)
    model = trained.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    model.train()
    w.validate(model, DistContext())
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.random.get_rng_state())


def test_a_resumed_run_ends_with_the_same_weights(built, tmp_path):
    from kubetrain.train.loop import fit

    w = task(built)
    whole = fit(w.cfg, w, DistContext())
    steps = whole.summary.steps // 2
    first = w.cfg.model_copy(
        update={"train": w.cfg.train.model_copy(update={"checkpoint_every_steps": steps})}
    )
    ckpt = tmp_path / "ckpt"

    class Stop(Exception):
        pass

    def stop_after_first_epoch(stats):
        raise Stop

    with pytest.raises(Stop):
        fit(first, w, DistContext(), on_epoch=stop_after_first_epoch, checkpoint_dir=ckpt)
    resumed_cfg = first.model_copy(
        update={"train": first.train.model_copy(update={"resume": True})}
    )
    resumed = fit(resumed_cfg, w, DistContext(), checkpoint_dir=ckpt)
    assert resumed.summary.resumed_from_step is not None
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


class Predictions(torch.nn.Module):
    """A 'detector' that answers from a table: image id -> its detections (for the evaluator
    test: fixed predictions, scored by our path and by pycocotools directly)."""

    def __init__(self, table, order):
        super().__init__()
        self.table, self.order = table, list(order)

    def forward(self, images):
        return [self.table[self.order.pop(0)] for _ in images]


def test_our_figures_equal_pycocotools_on_the_sources_own_ids(built):
    """Predictions made up from the ground truth (shifted boxes, random scores, some wrong
    classes, some missed, some invented) are scored by the task and by pycocotools run
    straight on the source's instances JSON with the source's image and category ids: every
    figure is the same."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _, _, _, coco, root = built
    w = task(built)
    rng = np.random.default_rng(0)
    records = list(w._records("test"))
    table, results = {}, []
    for r in records:
        boxes = record_boxes(r).astype(np.float64)
        labels = np.asarray(r["labels"])
        keep = rng.random(len(boxes)) > 0.2
        boxes, labels = boxes[keep] + rng.normal(0, 1.5, (keep.sum(), 4)), labels[keep]
        wrong = rng.random(len(labels)) < 0.25
        labels = np.where(wrong, rng.integers(1, 4, len(labels)), labels)
        if rng.random() < 0.5:  # an invented detection
            boxes = np.vstack([boxes, [[2, 2, 20, 20]]])
            labels = np.append(labels, 1)
        scores = rng.random(len(labels))
        table[int(r["image_id"])] = {"boxes": torch.tensor(boxes, dtype=torch.float32),
                                     "labels": torch.tensor(labels), "scores": torch.tensor(scores,
                                     dtype=torch.float32)}  # fmt: skip
        cat_ids = w.categories.ids_of(labels)
        for b, s, c in zip(boxes.astype(np.float32), scores.astype(np.float32), cat_ids,
                           strict=True):  # fmt: skip
            results.append({"image_id": int(r["source"]), "category_id": int(c),
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]),
                                     float(b[3] - b[1])], "score": float(s)})  # fmt: skip
    ours = w.score(Predictions(table, [int(r["image_id"]) for r in records]), "test").values
    gt = COCO(str(root / "annotations" / "instances_train.json"))
    dt = gt.loadRes(results)
    ev = COCOeval(gt, dt, "bbox")
    ev.params.imgIds = sorted(int(r["source"]) for r in records)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    names = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1",
             "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")  # fmt: skip
    for name, value in zip(names, ev.stats, strict=True):
        if value > -1:
            assert ours[name] == pytest.approx(value, abs=1e-9), name
        else:
            assert name not in ours
    assert 0.2 < ours["map_50"] < 0.95  # neither trivial nor perfect: the test can tell
    precision = ev.eval["precision"]
    for k, cat in enumerate(ev.params.catIds):
        name = next(c["name"] for c in coco["categories"] if c["id"] == cat)
        p = precision[:, :, k, 0, -1]
        assert ours["per_class_ap"][name] == pytest.approx(p[p > -1].mean(), abs=1e-9)


def test_score_reports_images_per_second_and_draws_the_worst_images_first(built, trained):
    w = task(built)
    scores = w.score(trained.model, "test")
    assert scores.metric == "map" and scores.samples == w.data.meta.sizes["test"]
    assert scores.values["images_per_second"] > 0
    errors = [e["missed"] + e["false"] for e in scores.examples]
    assert errors == sorted(errors, reverse=True)
    assert all(e["image"].startswith("data:image/png;base64,") for e in scores.examples)
    assert set(scores.values["per_class_ap"]) == {"square", "disc", "triangle"}
    json.dumps(scores.values)  # what details.json holds


def test_examples_are_one_padded_tensor_a_detector_takes(built, trained):
    w = task(built)
    x, counts = w.examples("val", 5)
    assert x.dim() == 4 and x.shape[:2] == (5, 3) and len(counts) == 5
    model = trained.model.eval()
    with torch.no_grad():
        out = model(x)
    assert len(out) == 5 and {"boxes", "labels", "scores"} <= set(out[0])


def test_a_model_that_is_not_a_detector_is_one_line(built):
    from kubetrain.train.loop import fit

    w = task(built, model={"name": "detection_factory:returns_a_tensor"})
    with pytest.raises(ConfigError, match="return a dict of loss tensors"):
        fit(w.cfg, w, DistContext())


def test_collate_keeps_sizes():
    a, b = torch.zeros(3, 10, 12), torch.zeros(3, 20, 8)
    images, targets = collate_detection([(a, {"x": 1}), (b, {"x": 2})])
    assert [i.shape for i in images] == [a.shape, b.shape] and targets == [{"x": 1}, {"x": 2}]
