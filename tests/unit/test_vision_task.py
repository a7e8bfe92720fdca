"""The image task: preprocess to shards + meta.json, transforms with the dataset's own
Normalize, every training sample once per epoch over ranks x workers, validation, examples and
scores, a mid-epoch resume, and the one-line refusals."""

from __future__ import annotations

import base64
import hashlib

import pytest

pytest.importorskip("torchvision", reason="the image task needs the vision extra")

import torch

from kubetrain.core.artifacts import DatasetArtifact
from kubetrain.core.distributed import DistContext
from kubetrain.core.errors import ConfigError, DataError
from kubetrain.data.config import DataConfig
from kubetrain.pipeline.config import PipelineConfig
from kubetrain.tasks import build_dataset, open_task
from kubetrain.tasks.images import ImageTask
from vision_data import image_folder

pytestmark = pytest.mark.vision

MODEL = {"name": "cnn", "channels": [8], "hidden_sizes": [16]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    counts = image_folder(root, classes=5, per_class=24)
    return root, counts


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset")
    data = {"source": str(folder[0]), "image_size": 16, "shard_samples": 10}
    meta = build_dataset(DataConfig(**data), out)
    return out, meta, data


def task(built, **data) -> ImageTask:
    out, _, base = built
    cfg = PipelineConfig.model_validate({"data": {**base, **data}, "model": MODEL})
    return open_task(cfg, DatasetArtifact.load(out))


def test_meta_describes_the_shards(built, folder):
    out, meta, _ = built
    assert meta.kind == "images" and meta.format_version == 1
    assert meta.classes == [f"class_{k}" for k in range(5)]
    assert meta.input_shape == [3, 16, 16]
    assert sum(meta.sizes.values()) == folder[1]["good"]
    assert meta.num_skipped == folder[1]["corrupt"]
    assert sum(sum(c.values()) for c in meta.class_counts.values()) == folder[1]["good"]
    assert len(meta.mean) == len(meta.std) == 3
    assert all(0 < m < 1 for m in meta.mean) and all(0 < s < 1 for s in meta.std)
    assert (out / "shards.json").is_file() and "root" not in meta
    assert DatasetArtifact.load(out).kind == "images"


def test_a_sharded_source_is_streamed_in_place(built, tmp_path):
    out, meta, _ = built
    again = build_dataset(DataConfig(source=str(out)), tmp_path / "ref")
    assert again.root == str(out) and again.version == meta.version
    assert not list((tmp_path / "ref").glob("*.parquet"))  # not copied
    data = DatasetArtifact.load(tmp_path / "ref")
    assert data.root == str(out)


def test_default_normalize_uses_the_training_split_statistics(built):
    x, _ = task(built).examples("train", 200)
    # Training images normalised with their own mean/std: about 0 and 1 per channel.
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.1
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.1


def test_own_normalize_replaces_the_default(built):
    spec = {"name": "Normalize", "kwargs": {"mean": [0, 0, 0], "std": [1, 1, 1]}}
    x, _ = task(built, transforms={"eval": [spec]}).examples("val", 8)
    assert x.min() >= 0 and x.max() <= 1


def test_eval_transforms_set_the_model_input_shape(built):
    crop = [{"name": "CenterCrop", "kwargs": {"size": 12}}]
    w = task(built, transforms={"train": crop, "eval": crop})
    assert w.data.input_shape == [3, 12, 12]
    assert w.examples("test", 4)[0].shape == (4, 3, 12, 12)
    assert w.build_model(w.cfg.model)(torch.zeros(2, 3, 12, 12)).shape == (2, 5)


def test_examples_are_a_seeded_subset(built):
    w = task(built)
    a, ya = w.examples("train", 10, seed=1)
    b, yb = w.examples("train", 10, seed=1)
    c, _ = w.examples("train", 10, seed=2)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)
    assert len(w.examples("val", 10_000)[1]) == built[1].num_samples("val")


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize(("world", "workers"), [(2, 0), (2, 2)], ids=["2x0", "2x2"])
def test_every_training_sample_once_per_epoch_over_ranks_and_workers(built, world, workers):
    """Without augmentation a training image is its own fingerprint: the ranks' batches of an
    epoch hold the whole training split, each image once."""
    from kubetrain.train.config import TrainConfig

    n_train = built[1].num_samples("train")  # 84: 2 ranks x 2 workers x (3 x 7) with micro 7
    w = task(built, num_workers=workers)
    tc = TrainConfig(batch_size=14, nproc=world)
    seen = []
    for rank in range(world):
        batches = w.train_batches(tc, DistContext(rank=rank, world_size=world))
        batches.set_epoch(1)
        steps = 0
        for (x,), _ in batches:
            seen += [_digest(img) for img in x]
            steps += 1
        assert steps == batches.steps  # equal on every rank
    everything, _ = w.examples("train", n_train)
    assert len(seen) == n_train
    assert sorted(seen) == sorted(_digest(img) for img in everything)


def test_mixup_gives_soft_labels(built):
    from kubetrain.train.config import TrainConfig

    w = task(built, mixup_alpha=0.4)
    batches = w.train_batches(TrainConfig(batch_size=8, nproc=1), DistContext())
    batches.set_epoch(0)
    (x,), y = next(iter(batches))
    assert x.shape == (8, 3, 16, 16) and y.shape == (8, 5) and y.dtype == torch.float32
    assert torch.allclose(y.sum(1), torch.ones(8))
    assert w.loss(torch.zeros(8, 5, requires_grad=True), y).item() > 0


def test_validate_and_score_agree_on_a_trained_model(built):
    w = task(built)
    torch.manual_seed(0)
    model = w.build_model(w.cfg.model).eval()
    loss, acc = w.validate(model, DistContext())
    scores = w.score(model, "val")
    assert scores.value == pytest.approx(acc) and loss > 0
    assert scores.metric == "accuracy" and scores.samples == built[1].num_samples("val")
    v = scores.values
    assert v["top5_accuracy"] == 1.0  # 5 classes: the true class is always in the top 5
    assert len(v["confusion_matrix"]) == 5 and set(v["per_class_accuracy"]) == set(w.data.classes)
    wrong = scores.samples - round(acc * scores.samples)
    assert len(scores.examples) == min(32, wrong)
    for ex in scores.examples:
        assert ex["true"] != ex["predicted"]
        head, _, payload = ex["image"].partition(",")
        assert head == "data:image/png;base64"
        assert base64.b64decode(payload)[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_nested_transform_argument_is_a_search_parameter(built):
    out, _, base = built
    flip = {"name": "RandomHorizontalFlip", "kwargs": {"p": 0.5}}
    cfg = PipelineConfig.model_validate({
        "data": {**base, "transforms": {"train": [flip]}}, "model": MODEL,
        "tune": {"parameters": [{"name": "data.transforms.train.0.kwargs.p",
                                 "parameterType": "double",
                                 "feasibleSpace": {"min": 0.1, "max": 0.9}}]},
    })  # fmt: skip
    tuned = cfg.with_params({"data.transforms.train.0.kwargs.p": 0.9})
    w = open_task(tuned, DatasetArtifact.load(out))
    assert w.train_transform.inner.specs[0]["kwargs"]["p"] == 0.9


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ({"image_size": None}, DataError, r"differ in size; set data.image_size"),
        ({"transforms": {"eval": [{"name": "Resise"}]}}, ConfigError,
         r"data.transforms.eval\[0\]: unknown transform 'Resise'"),
        ({"transforms": {"eval": [{"name": "Resize", "kwargs": {"size": 8}}]}}, ConfigError,
         r"data.transforms: train images come out .* but eval images"),
    ],
    ids=["sizes-differ", "unknown-transform", "train-eval-shapes-differ"],
)  # fmt: skip
def test_bad_image_settings_are_one_line(folder, tmp_path, data, error, match):
    cfg = DataConfig(**{"source": str(folder[0]), "image_size": 16, "shard_samples": 50, **data})
    with pytest.raises(error, match=match) as info:
        build_dataset(cfg, tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "meta.json").exists()


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet18"])
def test_an_image_model_on_tabular_data_is_one_line(tmp_path, name):
    (tmp_path / "t.csv").write_text("a,b,c,label\n" + "".join(
        f"{i},{i % 3},{i % 5},{i % 2}\n" for i in range(60)))  # fmt: skip
    data = {"source": str(tmp_path / "t.csv")}
    build_dataset(DataConfig(**data), tmp_path / "ds")
    cfg = PipelineConfig.model_validate({"data": data, "model": {"name": name}})
    w = open_task(cfg, DatasetArtifact.load(tmp_path / "ds"))
    with pytest.raises(ConfigError, match=r"model.name: .* needs image data \(C,H,W\)") as info:
        w.build_model(cfg.model)
    assert "\n" not in str(info.value)


def test_resume_mid_epoch_gives_the_weights_of_an_uninterrupted_run(built, tmp_path):
    """Two DataLoader workers, no random augmentation: interrupted after epoch 1 with a
    checkpoint in its middle, the resumed run ends bit for bit where the uninterrupted one did.
    (With random augmentation or MixUp the resumed run sees the same samples in the same order,
    but their random draws differ: the workers' generators are not part of a checkpoint.)"""
    from kubetrain.train.loop import Stopped, fit

    out, _, base = built

    def cfg():
        return PipelineConfig.model_validate({
            "data": {**base, "num_workers": 2}, "model": MODEL,
            "train": {"nproc": 1, "epochs": 2, "batch_size": 8, "checkpoint_every_steps": 7,
                      "seed": 3},
        })  # fmt: skip

    data = DatasetArtifact.load(out)
    whole = fit(cfg(), open_task(cfg(), data), DistContext(), checkpoint_dir=tmp_path / "a")
    with pytest.raises(Stopped):
        fit(cfg(), open_task(cfg(), data), DistContext(), on_epoch=lambda s: s.epoch == 1,
            checkpoint_dir=tmp_path / "b")  # fmt: skip
    # 84 training samples, 2 workers x 6 batches of 8: 12 steps an epoch; the newest checkpoint
    # (step 7) is in the middle of epoch 1.
    assert [p.name for p in tmp_path.glob("b/ckpt-*.pt")] == ["ckpt-00000007.pt"]
    resumed = fit(cfg(), open_task(cfg(), data), DistContext(), checkpoint_dir=tmp_path / "b")
    assert resumed.summary.resumed_from_step == 7
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_loader_workers_decode(built):
    """A DataLoader over the train stream with workers gives float images of the input shape."""
    w = task(built, num_workers=2)
    from kubetrain.train.config import TrainConfig

    batches = w.train_batches(TrainConfig(batch_size=4, nproc=1), DistContext())
    batches.set_epoch(0)
    (x,), y = next(iter(batches))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 16, 16) and y.dtype == torch.int64
