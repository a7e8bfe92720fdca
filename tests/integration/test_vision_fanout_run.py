"""Images preprocessed fanned out under kfp.local with the pipeline's own wiring: the dataset
(version, shards, mean and std) is the one-task preprocess's. (The text fan-out test checks the
re-run from the cache.)"""

from __future__ import annotations

import hashlib

import pytest

pytest.importorskip("torchvision", reason="the image meta needs the vision extra")

from fanout_pipeline import run_preprocess
from kubetrain.core.artifacts import DatasetArtifact
from kubetrain.pipeline.config import load_config
from kubetrain.tasks import build_dataset
from vision_data import image_folder

pytestmark = pytest.mark.vision


def test_images_fanned_out_under_kfp_local_are_the_one_task_dataset(tmp_path):
    image_folder(tmp_path / "images", classes=4, per_class=20)
    sets = [f"data.source={tmp_path / 'images'}", "data.image_size=16", "data.shard_samples=6",
            "model.name=cnn"]  # fmt: skip
    one = build_dataset(load_config(None, sets).data, tmp_path / "one")
    dataset = run_preprocess(load_config(None, [*sets, "data.parallel_tasks=3"]), tmp_path)
    meta = DatasetArtifact.read_meta(dataset)
    same = ("version", "sizes", "mean", "std", "class_counts", "num_skipped", "input_shape")
    assert {k: getattr(meta, k) for k in same} == {k: getattr(one, k) for k in same}
    assert meta.preprocess_tasks == 3

    def digests(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.glob("*.parquet")}

    assert digests(dataset) == digests(tmp_path / "one") and len(digests(dataset)) > 3
