"""Images preprocessed by plan -> convert x N -> merge: the same shards, manifest and version for
N = 1, 2, 3 as the one-task build, and the training split's channel statistics combined exactly
from the convert tasks' parts (Pillow only, but for the last test, which builds the meta)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kubetrain.core.records import DatasetPart, PixelSums
from kubetrain.data.config import DataConfig
from kubetrain.data.fanout import gather, ordered_results, task_slots
from kubetrain.data.images import (
    ImagePlan,
    build_image_dataset,
    convert_image_shards,
    merge_image_shards,
    plan_image_shards,
    stats_quotas,
)
from kubetrain.data.shards import read_manifest, read_shard
from vision_data import image_folder

pytestmark = pytest.mark.vision


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images") / "folder"
    image_folder(root, classes=4, per_class=15)  # with the broken files of vision_data.CORRUPT
    return root


def cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), shard_samples=5, image_size=16, **kw)


def fan_out(config: DataConfig, tmp_path, num_tasks: int):
    """The data-level plan, N conversions (each from the saved plan, into a root of its own, as
    separate tasks would) and the merge; returns the manifest and the merged root."""
    planned = plan_image_shards(config, num_tasks)
    planned.save(tmp_path / "plan")
    parts = []
    for task in range(num_tasks):
        plan = ImagePlan.load(tmp_path / "plan", planned.record)
        root = str(tmp_path / f"part-{task}")
        slots = convert_image_shards(config, plan, task_slots(plan.record, task), root)
        parts.append((DatasetPart(kind="images", fingerprint=plan.record.fingerprint,
                                  task=task, slots=slots), root))  # fmt: skip
    roots = {p.task: root for p, root in parts}
    ordered = ordered_results(planned.record, [p for p, _ in parts])
    out = str(tmp_path / "dataset")
    gather([(r, roots[p.task]) for r, p in ordered], out)
    manifest = merge_image_shards(config, planned, [r for r, _ in ordered], out)
    return manifest, out


def test_every_number_of_tasks_writes_the_one_task_dataset_byte_for_byte(folder, tmp_path):
    config = cfg(folder, num_workers=0)
    one = build_image_dataset(config, str(tmp_path / "one"))
    assert one.provenance["num_skipped"] > 0  # the broken files are skipped, whichever task
    for n in (1, 2, 3):
        manifest, out = fan_out(config, tmp_path / f"n{n}", n)
        assert manifest.version == one.version, n
        assert manifest.splits == one.splits, n  # every shard's digest
        assert manifest.class_counts == one.class_counts
        assert manifest.provenance == one.provenance  # skipped images and pixel sums included
        assert read_manifest(out).to_json() == read_manifest(str(tmp_path / "one")).to_json()
    assert all(b > a for a, b in plan_image_shards(config, 3).record.ranges)  # 3 real tasks


def test_the_channel_statistics_are_the_per_shard_sums_added_in_shard_order(folder, tmp_path):
    config = cfg(folder)
    manifest, out = fan_out(config, tmp_path, 3)
    plan = plan_image_shards(config, 3).record
    quotas = stats_quotas(plan, limit=12)  # a budget that ends inside a shard
    assert sum(quotas) == 12 and quotas.count(0) < len(quotas)
    merged = PixelSums.model_validate(manifest.provenance["pixel_sums"])
    # Recomputed here, image by image, from the stored shards: the planned first images of the
    # training split (all of them, with the default budget of 10 000).
    images = []
    for shard in manifest.splits["train"]:
        images += read_shard(out, shard)["image"]
    pixels = np.concatenate(
        [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.float64).reshape(-1, 3) / 255
         for b in images]
    )  # fmt: skip
    assert merged.images == len(images) and merged.pixels == len(pixels)
    np.testing.assert_allclose(merged.sum, pixels.sum(0), rtol=1e-12)
    np.testing.assert_allclose(merged.squares, (pixels**2).sum(0), rtol=1e-12)


def test_the_meta_of_a_fanned_out_build_is_the_one_task_build_s(folder, tmp_path):
    pytest.importorskip("torchvision", reason="the image meta needs the eval transforms")
    from kubetrain.core.artifacts import DatasetArtifact
    from kubetrain.tasks import build_dataset, convert_range, merge_dataset, plan_dataset

    config = cfg(folder)
    one = build_dataset(config, tmp_path / "one")
    plan_dataset(config, tmp_path / "plan", 3)
    parts = [tmp_path / f"part-{k}" for k in range(3)]
    for k, part in enumerate(parts):
        convert_range(tmp_path / "plan", k, part)
    merged = merge_dataset(tmp_path / "plan", parts, tmp_path / "dataset")
    assert DatasetArtifact.is_complete(tmp_path / "dataset")
    same = ("version", "sizes", "class_counts", "mean", "std", "input_shape", "num_skipped")
    assert {k: getattr(merged, k) for k in same} == {k: getattr(one, k) for k in same}
    assert (merged.preprocess_tasks, one.preprocess_tasks) == (3, 1)
