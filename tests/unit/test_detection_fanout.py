"""Detection preprocessed by plan -> convert x N -> merge: for COCO, VOC and YOLO sources (and
the box checks' counts of a COCO file with bad annotations) the same shards and manifest as the
one-task build for N = 1, 2, 3; the last test, which builds the meta, needs torchvision."""

from __future__ import annotations

import pytest

from detection_data import coco_folder, voc_folder, yolo_folder
from kubetrain.core.records import DatasetPart
from kubetrain.data.config import DataConfig
from kubetrain.data.detection import (
    DetectionPlan,
    build_detection_dataset,
    convert_detection_shards,
    merge_detection_shards,
    plan_detection_shards,
)
from kubetrain.data.fanout import gather, ordered_results, task_slots
from kubetrain.data.shards import read_manifest

BAD = [
    {"image_id": 100, "category_id": 1, "bbox": [10, 10, 0, 5]},  # zero width: dropped
    {"image_id": 101, "category_id": 1, "bbox": [50, 50, 40, 40]},  # reaches out: clipped
    {"image_id": 999, "category_id": 1, "bbox": [1, 1, 4, 4]},  # no such image: dropped
]


def cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), task="detection", shard_samples=4, **kw)


def fan_out(config: DataConfig, tmp_path, num_tasks: int):
    """Plan, N conversions (each from the saved plan into a root of its own), merge."""
    planned = plan_detection_shards(config, num_tasks)
    planned.save(tmp_path / "plan")
    parts, roots = [], {}
    for task in range(num_tasks):
        plan = DetectionPlan.load(tmp_path / "plan", planned.record)
        roots[task] = str(tmp_path / f"part-{task}")
        slots = convert_detection_shards(config, plan, task_slots(plan.record, task), roots[task])
        parts.append(DatasetPart(kind="detection", fingerprint=plan.record.fingerprint,
                                 task=task, slots=slots))  # fmt: skip
    ordered = ordered_results(planned.record, parts)
    out = str(tmp_path / "dataset")
    gather([(r, roots[p.task]) for r, p in ordered], out)
    return merge_detection_shards(config, planned, [r for r, _ in ordered], out), out


@pytest.mark.parametrize("fmt", ["coco", "voc", "yolo", "coco-with-bad-boxes"])
def test_every_number_of_tasks_writes_the_one_task_dataset(tmp_path, fmt):
    source = tmp_path / "source"
    if fmt == "voc":
        voc_folder(source)
    elif fmt == "yolo":
        yolo_folder(source)
    else:
        coco_folder(source, extra_annotations=BAD if fmt != "coco" else ())
    config = cfg(source)
    one = build_detection_dataset(config, str(tmp_path / "one"))
    if fmt == "coco-with-bad-boxes":
        assert one.provenance["boxes"]["clipped"] and one.provenance["boxes"]["dropped"]
    for n in (1, 2, 3):
        manifest, out = fan_out(config, tmp_path / f"n{n}", n)
        assert manifest.to_json() == one.to_json(), n  # shards' digests, counts, provenance
        assert read_manifest(out).version == one.version
    assert all(b > a for a, b in plan_detection_shards(config, 3).record.ranges)


@pytest.mark.vision  # run by make test-vision, where torchvision is
def test_the_meta_of_a_fanned_out_detection_build_is_the_one_task_build_s(tmp_path):
    pytest.importorskip("torchvision", reason="the detection task needs torchvision")
    from kubetrain.tasks import build_dataset, convert_range, merge_dataset, plan_dataset

    coco_folder(tmp_path / "source", extra_annotations=BAD)
    config = cfg(tmp_path / "source")
    one = build_dataset(config, tmp_path / "one")
    plan = plan_dataset(config, tmp_path / "plan", 3)
    assert plan.kind == "detection" and not plan.whole
    parts = [tmp_path / f"part-{k}" for k in range(3)]
    for k, part in enumerate(parts):
        convert_range(tmp_path / "plan", k, part)
    merged = merge_dataset(tmp_path / "plan", parts, tmp_path / "dataset")
    same = ("version", "sizes", "class_counts", "objects", "empty_images", "boxes", "categories")
    assert {k: getattr(merged, k) for k in same} == {k: getattr(one, k) for k in same}
    assert merged.preprocess_tasks == 3
