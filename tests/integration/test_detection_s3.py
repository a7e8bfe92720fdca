"""Detection sources on a real S3 endpoint (moto's server on 127.0.0.1): COCO, VOC and YOLO
folders uploaded to it build the same shards as their local copies, with shards written back
to it."""

from __future__ import annotations

import pytest

from detection_data import coco_folder, voc_folder, yolo_folder
from kubetrain.data.config import DataConfig
from kubetrain.data.detection import build_detection_dataset
from servers import s3_server

pytestmark = [pytest.mark.integration, pytest.mark.vision]


@pytest.fixture(scope="module")
def uploaded(tmp_path_factory):
    import s3fs

    local = tmp_path_factory.mktemp("upload")
    coco_folder(local / "coco", count=24, category_ids=(2, 4, 8))
    voc_folder(local / "voc", count=24)
    yolo_folder(local / "yolo", count=24)
    with s3_server() as s3:
        s3.make_bucket("boxes")
        fs = s3fs.S3FileSystem(**s3.storage_options)
        for name in ("coco", "voc", "yolo"):
            fs.put(str(local / name) + "/", f"boxes/{name}/", recursive=True)
        yield s3, local


@pytest.mark.parametrize("fmt", ["coco", "voc", "yolo"])
def test_an_s3_source_builds_the_same_shards_as_its_local_copy(uploaded, tmp_path, fmt):
    s3, local = uploaded
    remote = build_detection_dataset(
        DataConfig(source=f"s3://boxes/{fmt}", task="detection", shard_samples=8,
                   storage_options=s3.storage_options, num_workers=2),
        f"s3://boxes/out-{fmt}",
    )  # fmt: skip
    mine = build_detection_dataset(
        DataConfig(source=str(local / fmt), task="detection", shard_samples=8),
        str(tmp_path / "from-disk"),
    )
    assert remote.meta["annotation_format"] == fmt
    assert sum(remote.num_samples(s) for s in remote.splits) == 24
    # Same bytes in, same shards out, whatever the store.
    assert remote.version == mine.version
