"""Images through the real pipeline: ``kubetrain run`` on an image folder the test writes (every
step under kfp.local, 2 torchrun workers), training streamed from ``s3://`` (moto's server on
127.0.0.1), and a rank's memory that does not grow with the number of images."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torchvision", reason="the image task needs the vision extra")

from servers import s3_server
from tests.conftest import run_cli
from vision_data import image_folder

pytestmark = [pytest.mark.integration, pytest.mark.vision]

RUN = """
data:
  source: {source}
  image_size: 32
  shard_samples: 64
  num_workers: 1
  transforms:
    train:
      - {{name: RandomCrop, kwargs: {{size: 32, padding: 2}}}}
      - {{name: RandomHorizontalFlip, kwargs: {{p: 0.5}}}}
model:
  name: cnn
  channels: [16, 32]
  hidden_sizes: [64]
train:
  epochs: 3
  batch_size: 32
  lr: 0.003
  nproc: 2
tune:
  max_trials: 2
  parallel_trials: 2
  trial_epochs: 1
  parameters:
    - name: data.mixup_alpha
      parameterType: categorical
      feasibleSpace: {{list: [0.0, 0.2]}}
    - name: data.transforms.train.1.kwargs.p
      parameterType: double
      feasibleSpace: {{min: "0.0", max: "0.5"}}
quantize:
  method: dynamic_int8
evaluate:
  min_accuracy: 0.3
  latency_repeats: 3
  latency_batch_sizes: [1, 16]
"""


def test_kubetrain_run_on_an_image_folder_through_every_step(tmp_path):
    """300 images of 5 classes (32-64 px, PNG/JPEG/WebP/BMP, RGB/L/RGBA/16-bit/palette) and 3
    broken files: preprocess, a search over MixUp and a nested transform argument, DDP
    training, int8, evaluation and the gate, all from one command."""
    counts = image_folder(tmp_path / "images", classes=5, per_class=60)
    (tmp_path / "vision.yaml").write_text(RUN.format(source=tmp_path / "images"))
    out = tmp_path / "run"
    proc = run_cli("run", "--config", str(tmp_path / "vision.yaml"), "--output", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["test_samples"] - counts["good"] * 0.15) <= 5  # stratified: +-1 a class
    assert metrics["train_world_size"] == 2 and metrics["train_ranks_identical"] is True
    assert metrics["tune_trials"] == 2
    assert metrics["test_accuracy_fp32"] > 0.4  # 5 classes: chance is 0.2
    assert abs(metrics["test_accuracy_fp32"] - metrics["test_accuracy_int8"]) <= 0.05
    assert metrics["model_size_bytes_int8"] < 0.5 * metrics["model_size_bytes_fp32"]
    assert metrics["promoted"] is (
        min(metrics["test_accuracy_fp32"], metrics["test_accuracy_int8"]) >= 0.3
    )
    assert "test accuracy fp32:" in proc.stdout
    report = (out / "report.html").read_text()
    if metrics["test_accuracy_fp32"] < 1:  # the misclassified images, as PNG data URIs
        assert "Misclassified test images" in report and "alt='test image'" in report
        assert report.count("data:image/png;base64,") >= 5  # plots and at least one image


MODELS = """
data:
  source: {source}
  image_size: 32
  shard_samples: 64
model:
  name: {model}
  kwargs: {kwargs}
train:
  epochs: 2
  batch_size: 32
  lr: 0.003
  nproc: 2
tune:
  max_trials: 2
  parallel_trials: 2
  trial_epochs: 1
  parameters:
    - name: train.lr
      parameterType: double
      feasibleSpace: {{min: "0.001", max: "0.004"}}
quantize:
  method: dynamic_int8
  max_accuracy_drop: 0.5
evaluate:
  min_accuracy: 0.0
  latency_repeats: 3
  latency_batch_sizes: [1, 8]
"""


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [("vision_factory:tiny_net", "{width: 12}"), ("timm:resnet10t", "{}")],
    ids=["own-factory", "timm"],
)
def test_a_model_from_outside_kubetrain_goes_through_every_step(
    tmp_path, monkeypatch, model, kwargs
):
    """A user's ``package.module:factory`` (importable through PYTHONPATH, as a pip-installed
    package would be) and a timm architecture, rebuilt wherever a step needs the model: the
    search's trial processes, 2 torchrun workers, quantize, evaluate."""
    if model.startswith("timm:"):
        pytest.importorskip("timm", reason="timm is an optional extra")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[1]))
    image_folder(tmp_path / "images", classes=3, per_class=40)
    (tmp_path / "own.yaml").write_text(
        MODELS.format(source=tmp_path / "images", model=model, kwargs=kwargs)
    )
    out = tmp_path / "run"
    proc = run_cli("run", "--config", str(tmp_path / "own.yaml"), "--output", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tune_trials"] == 2 and metrics["train_world_size"] == 2
    assert metrics["test_accuracy_int8"] is not None and metrics["model_size_bytes_int8"] > 0
    spec = json.loads(next(out.rglob("train/model/model.json")).read_text())
    assert spec["config"]["name"] == model


def test_training_streams_shards_from_s3(tmp_path):
    """Shards written to a bucket; the dataset artifact points at them (nothing copied) and the
    two training processes read them over the S3 protocol."""
    import s3fs

    from kubetrain.core.io import read_json
    from kubetrain.data.config import DataConfig
    from kubetrain.data.images import build_image_dataset
    from kubetrain.pipeline import steps
    from kubetrain.pipeline.config import PipelineConfig

    image_folder(tmp_path / "images", classes=4, per_class=30)
    with s3_server() as s3:
        s3.make_bucket("data")
        fs = s3fs.S3FileSystem(**s3.storage_options)
        fs.put(str(tmp_path / "images") + "/", "data/images/", recursive=True)
        options = s3.storage_options
        build_image_dataset(
            DataConfig(source="s3://data/images", storage_options=options, image_size=24,
                       shard_samples=16, num_workers=2),
            "s3://data/shards",
        )  # fmt: skip
        cfg = PipelineConfig.model_validate({
            "data": {"source": "s3://data/shards", "storage_options": options, "num_workers": 1},
            "model": {"name": "cnn", "channels": [8], "hidden_sizes": [32]},
            "train": {"epochs": 2, "batch_size": 16, "nproc": 2}, "tune": {"enabled": False},
        })  # fmt: skip
        meta = steps.preprocess(cfg, tmp_path / "dataset")
        assert meta.root == "s3://data/shards" and meta.input_shape == [3, 24, 24]
        assert not list((tmp_path / "dataset").glob("*.parquet"))
        summary = steps.train(cfg, tmp_path / "dataset", tmp_path / "model")
    assert summary.world_size == 2 and summary.ranks_identical is True
    history = read_json(tmp_path / "model" / "history.json")
    assert len(history) == 2 and all(h["val_loss"] > 0 for h in history)


# A rank streaming an image dataset's training split through the task (decode, Normalize,
# 2 loader workers) in its own process; prints images seen and its peak RSS (KiB).
_RANK = """
import resource, sys
from kubetrain.core.artifacts import DatasetArtifact
from kubetrain.pipeline.config import PipelineConfig
from kubetrain.train.config import TrainConfig
from kubetrain.core.distributed import DistContext
from kubetrain.tasks import open_task
data = DatasetArtifact.load(sys.argv[1])
cfg = PipelineConfig.model_validate({"data": {"source": data.root, "num_workers": 0}})
batches = open_task(cfg, data).train_batches(TrainConfig(batch_size=16, nproc=1), DistContext())
batches.set_epoch(0)
print(sum(len(y) for _, y in batches), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _padded_shards(root, n: int) -> None:
    """A sharded image dataset of ``n`` distinct 32x32 PNGs that each carry 64 KiB of text
    metadata: the bytes a rank would hold if it kept images (375 MiB for 6000), at the decoding
    cost of small images."""
    from PIL import Image, PngImagePlugin

    from kubetrain.data.shards import ShardWriter, save_manifest, write_manifest

    rng = np.random.default_rng(n)
    writers = []
    for split, count in (("train", n), ("val", 16), ("test", 16)):
        with ShardWriter(str(root), split, max_samples=200) as w:
            for i in range(count):
                info = PngImagePlugin.PngInfo()
                info.add_text("padding", base64.b64encode(rng.bytes(48 << 10)).decode())
                buf = io.BytesIO()
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info, compress_level=0)
                w.write({"image": buf.getvalue(), "label": i % 2})
        writers.append(w)
    manifest = write_manifest(str(root), writers)
    manifest.meta = {"kind": "images", "classes": ["a", "b"], "image_mode": "RGB",
                     "input_shape": [3, 32, 32]}  # fmt: skip
    save_manifest(str(root), manifest)


def test_a_ranks_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Peak RSS of a rank streaming 10x more images stays within 15 %: 6000 PNGs of 67 KiB
    (about 400 MiB) against 600, on top of torch and torchvision. Holding the split, or a tenth
    of it, would show."""
    from kubetrain.data.config import DataConfig
    from kubetrain.tasks.images import build

    def peak(n: int) -> tuple[int, int]:
        _padded_shards(tmp_path / f"shards{n}", n)
        build(DataConfig(source=str(tmp_path / f"shards{n}")), tmp_path / f"ds{n}")
        out = subprocess.run([sys.executable, "-c", _RANK, str(tmp_path / f"ds{n}")], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        seen, rss_kib = map(int, out.split()[-2:])
        return seen, rss_kib

    n_small, small = peak(600)
    n_large, large = peak(6000)
    assert (n_small, n_large) == (600, 6000)
    assert large <= 1.15 * small, (small, large)
