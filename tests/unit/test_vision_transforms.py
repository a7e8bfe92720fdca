"""torchvision.transforms.v2 pipelines from YAML, MixUp/CutMix, decoding, and a streamed epoch of
image shards through StreamingDataset with DataLoader workers."""

from __future__ import annotations

import io

import pytest

pytest.importorskip(
    "torchvision", reason="image transforms need the vision extra (make test-vision)"
)

import torch
from PIL import Image
from torch.utils.data import DataLoader

from kubetrain.core.errors import ConfigError
from kubetrain.data.config import DataConfig
from kubetrain.data.images import build_image_dataset
from kubetrain.data.streaming import StreamingDataset
from kubetrain.data.transforms import (
    ImageTransform,
    batch_specs,
    build_pipeline,
    decode_image,
    image_transforms,
)
from kubetrain.pipeline.config import load_config
from vision_data import encode, image_folder, render

pytestmark = pytest.mark.vision

YAML = """
data:
  transforms:
    train:
      - {name: RandomResizedCrop, kwargs: {size: 24, scale: [0.5, 1.0], antialias: true}}
      - {name: RandomHorizontalFlip}
      - {name: RandomApply, kwargs: {transforms: [{name: ColorJitter, kwargs: {brightness: 0.3}}], p: 0.5}}
      - {name: TrivialAugmentWide, kwargs: {interpolation: bilinear}}
      - {name: Normalize, kwargs: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}
    eval:
      - {name: Resize, kwargs: {size: 28}}
      - {name: CenterCrop, kwargs: {size: 24}}
      - {name: Normalize, kwargs: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}
  mixup_alpha: 0.2
  cutmix_alpha: 1.0
"""


def record(label=3, mode="RGB", fmt="PNG"):
    return {"image": encode(render(label, 1, mode), fmt), "label": label}


def test_pipelines_from_yaml_augment_and_normalise(tmp_path):
    (tmp_path / "c.yaml").write_text(YAML)
    cfg = load_config(tmp_path / "c.yaml").data
    train, evaluate, collate = image_transforms(cfg, num_classes=10)
    image, label = train(record())
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and label == 3
    assert image.min() < 0  # normalised after the float conversion kubetrain put before it
    a, b = evaluate(record()), evaluate(record())
    assert torch.equal(a[0], b[0])  # eval is deterministic
    images, labels = collate([train(record(k)) for k in range(4)])
    assert images.shape == (4, 3, 24, 24)
    assert labels.shape == (4, 10) and torch.allclose(labels.sum(1), torch.ones(4))  # soft labels
    assert [s["name"] for s in batch_specs(cfg)] == ["RandomChoice"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "RandomFlip"}, r"data.transforms.train\[1\]: unknown transform 'RandomFlip' .*did you mean"),
        ({"name": "functional"}, r"data.transforms.train\[1\]: unknown transform 'functional'"),
        ({"name": "ColorJitter", "kwargs": {"brightnes": 0.2}}, r"data.transforms.train\[1\] \(ColorJitter\): .*brightnes"),
        ({"name": "RandomRotation", "kwargs": {"degrees": -5}}, r"data.transforms.train\[1\] \(RandomRotation\): .*positive"),
        ({"name": "ToDtype", "kwargs": {"dtype": "float99"}}, r"data.transforms.train\[1\].kwargs.dtype: 'float99' is not a torch dtype"),
        ({"name": "RandomApply", "kwargs": {"transforms": [{"name": "Blur"}]}}, r"data.transforms.train\[1\].kwargs.transforms\[0\]: unknown transform 'Blur'"),
        ({"name": "Normalize", "kwargs": {"mean": [0.5], "std": [0.2, 0.2]}}, r"data.transforms.train\[1\] \(Normalize\): "),
    ],
    ids=["unknown", "not-a-class", "bad-kwarg", "bad-value", "bad-dtype", "nested", "fails-on-data"],
)  # fmt: skip
def test_a_wrong_entry_is_one_line_naming_it(entry, message):
    cfg = DataConfig.model_validate(
        {"transforms": {"train": [{"name": "RandomHorizontalFlip"}, entry]}}
    )
    with pytest.raises(ConfigError, match=message) as err:
        image_transforms(cfg, num_classes=10)
    assert "\n" not in str(err.value)


def test_train_and_eval_sizes_must_agree():
    cfg = DataConfig.model_validate(
        {"transforms": {"train": [{"name": "RandomCrop", "kwargs": {"size": 16}}]}}
    )
    with pytest.raises(ConfigError, match=r"train images come out \(3, 16, 16\) but eval images"):
        image_transforms(cfg, num_classes=10)


def test_without_transforms_images_become_float_in_zero_one():
    image = build_pipeline([], "x")(decode_image(record()["image"]))
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1


@pytest.mark.parametrize(
    ("fmt", "mode"), [("PNG", "L"), ("JPEG", "RGB"), ("BMP", "RGB"), ("WEBP", "RGB")]
)
@pytest.mark.parametrize("target", ["RGB", "L"])
def test_decoding_gives_the_mode_asked_for(fmt, mode, target):
    img = render(2, 5, mode)
    out = decode_image(encode(img, fmt), target)
    assert out.dtype == torch.uint8 and out.shape == (len(target), img.height, img.width)


def test_a_transform_pickles_without_its_built_pipeline():
    import pickle

    t = ImageTransform([{"name": "RandomHorizontalFlip"}])
    t(record())
    clone = pickle.loads(pickle.dumps(t))
    assert clone._pipeline is None and clone(record())[0].shape == t(record())[0].shape


def test_an_epoch_streams_through_the_transform_in_dataloader_workers(tmp_path):
    image_folder(tmp_path / "f", classes=10, per_class=12)
    manifest = build_image_dataset(
        DataConfig(source=str(tmp_path / "f"), image_size=32, shard_samples=10), str(tmp_path / "s")
    )
    cfg = DataConfig.model_validate(
        {"transforms": {"train": [{"name": "RandomCrop", "kwargs": {"size": 32, "padding": 4}}]},
         "mixup_alpha": 0.4}
    )  # fmt: skip
    train, _, collate = image_transforms(cfg, num_classes=10, mode=manifest.meta["image_mode"])
    ds = StreamingDataset(
        str(tmp_path / "s"), "train", 8, num_workers=2, transform=train, collate=collate
    )
    n, label_sum = 0, torch.zeros(10)
    for images, labels in DataLoader(ds, batch_size=None, num_workers=2):
        assert images.shape[1:] == (3, 32, 32) and labels.shape[1] == 10
        n += len(images)
        label_sum += labels.sum(0)
    assert n == manifest.num_samples("train")
    # MixUp mixes a batch with a permutation of itself, so each class keeps its label mass: per
    # class, the epoch's soft labels add up to the manifest's count (every sample seen once).
    counts = torch.tensor(
        [manifest.class_counts["train"][str(k)] for k in range(10)], dtype=torch.float
    )
    assert torch.allclose(label_sum, counts, atol=1e-4)


def test_a_stored_image_decodes_to_its_pixels(tmp_path):
    png = encode(render(4, 2), "PNG")
    out = decode_image(png).permute(1, 2, 0).numpy()
    assert (out == __import__("numpy").asarray(Image.open(io.BytesIO(png)).convert("RGB"))).all()
