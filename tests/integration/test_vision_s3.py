"""Image sources and image shards on a real S3 endpoint (moto's server on 127.0.0.1): an image
folder and tar shards uploaded to it, built into shards written back to it, streamed from it."""

from __future__ import annotations

import pytest

from kubetrain.data.config import DataConfig
from kubetrain.data.images import build_image_dataset
from kubetrain.data.shards import read_manifest
from servers import s3_server
from vision_data import image_folder, tar_shards

pytestmark = [pytest.mark.integration, pytest.mark.vision]


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def uploaded(s3, tmp_path_factory):
    """An image folder and three tar shards in bucket ``images``."""
    import s3fs

    local = tmp_path_factory.mktemp("upload")
    counts = image_folder(local / "folder", classes=10, per_class=8)
    # A manifest beside the class folders, with paths relative to it (not a sample itself).
    rows = sorted(p.relative_to(local / "folder") for p in (local / "folder").glob("*/*"))
    (local / "folder" / "index.csv").write_text(
        "image,label\n" + "".join(f"{p},{p.parent}\n" for p in rows if p.suffix != ".txt")
    )
    tar_shards(local / "tars", classes=10, per_class=8, num_shards=3)
    s3.make_bucket("images")
    fs = s3fs.S3FileSystem(**s3.storage_options)
    fs.put(str(local / "folder") + "/", "images/folder/", recursive=True)
    fs.put(str(local / "tars") + "/", "images/tars/", recursive=True)
    return local, counts


@pytest.mark.parametrize(
    ("source", "local_source"),
    [
        ("s3://images/folder", "folder"),
        ("s3://images/folder/index.csv", "folder/index.csv"),
        ("s3://images/tars/train-{000000..000002}.tar", None),
    ],
    ids=["folder", "manifest", "tars"],
)
def test_an_s3_source_builds_the_same_shards_as_its_local_copy(
    s3, uploaded, tmp_path, source, local_source
):
    local, counts = uploaded
    remote = build_image_dataset(
        DataConfig(
            source=source, storage_options=s3.storage_options, image_size=32,
            shard_samples=16, num_workers=2,
        ),
        str(tmp_path / "from-s3"),
    )  # fmt: skip
    assert sum(remote.num_samples(s) for s in remote.splits) == counts["good"]
    if local_source:
        assert remote.provenance["num_skipped"] == counts["corrupt"]
        mine = build_image_dataset(
            DataConfig(source=str(local / local_source), image_size=32, shard_samples=16),
            str(tmp_path / "from-disk"),
        )
        # Same bytes in, same shards out: the content version does not depend on the store.
        assert mine.version == remote.version


def test_shards_written_to_s3_are_a_cache_hit_on_a_second_build(s3, uploaded):
    import s3fs

    cfg = DataConfig(
        source="s3://images/folder", storage_options=s3.storage_options, shard_samples=32
    )
    first = build_image_dataset(cfg, "s3://images/built")
    fs = s3fs.S3FileSystem(**s3.storage_options)
    before = {p: fs.info(p)["ETag"] for p in fs.ls("images/built")}
    assert build_image_dataset(cfg, "s3://images/built").version == first.version
    assert {p: fs.info(p)["ETag"] for p in fs.ls("images/built")} == before
    assert read_manifest("s3://images/built", s3.storage_options).version == first.version


def test_an_epoch_streams_from_s3_through_the_image_transform(s3, uploaded):
    pytest.importorskip("torchvision", reason="image transforms need the vision extra")
    from torch.utils.data import DataLoader

    from kubetrain.data.streaming import StreamingDataset
    from kubetrain.data.transforms import BatchCollate, ImageTransform

    cfg = DataConfig(
        source="s3://images/tars/train-{000000..000002}.tar",
        storage_options=s3.storage_options,
        image_size=32,
        shard_samples=8,
    )
    manifest = build_image_dataset(cfg, "s3://images/streamed")
    transform = ImageTransform([{"name": "RandomHorizontalFlip"}], manifest.meta["image_mode"])
    seen = 0
    for rank in range(2):
        ds = StreamingDataset(
            "s3://images/streamed", "train", 8, rank=rank, world_size=2, num_workers=2,
            transform=transform, collate=BatchCollate([], 10),
            storage_options=s3.storage_options,
        )  # fmt: skip
        for images, labels in DataLoader(ds, batch_size=None, num_workers=2):
            assert images.shape[1:] == (3, 32, 32) and images.dtype.is_floating_point
            seen += len(labels)
    assert seen == manifest.num_samples("train")


def test_model_weights_load_from_an_s3_uri(s3, tmp_path):
    import s3fs
    import torch

    from kubetrain.models.config import ModelConfig
    from kubetrain.models.vision import build_model

    source = build_model(ModelConfig(name="vision_factory:tiny_net"), [3, 32, 32], 4)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    s3.make_bucket("weights")
    s3fs.S3FileSystem(**s3.storage_options).put(str(tmp_path / "w.pt"), "weights/tiny/w.pt")
    cfg = ModelConfig(name="vision_factory:tiny_net", weights="s3://weights/tiny/w.pt")
    model = build_model(cfg, [3, 32, 32], 4, storage_options=s3.storage_options)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), source.state_dict().values(), strict=True)
    )


def test_credentials_and_endpoint_from_the_environment_alone(s3, uploaded, tmp_path, monkeypatch):
    """No data.storage_options: s3fs (botocore) reads the AWS_* variables, as in a pod whose
    Secret is mounted as environment."""
    import s3fs

    for name, value in {
        "AWS_ACCESS_KEY_ID": s3.key,
        "AWS_SECRET_ACCESS_KEY": s3.secret,
        "AWS_ENDPOINT_URL": s3.url,
        "AWS_DEFAULT_REGION": s3.region,
    }.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    manifest = build_image_dataset(
        DataConfig(source="s3://images/tars/train-{000000..000002}.tar"), str(tmp_path / "env")
    )
    assert sum(manifest.num_samples(s) for s in manifest.splits) == 80
