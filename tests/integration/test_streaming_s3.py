"""Shards written to and streamed from a real S3 endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader

from kubetrain.core.errors import DataError
from kubetrain.data.shards import read_manifest
from kubetrain.data.streaming import StreamingDataset
from servers import s3_server
from sharded import ids_collate, write_dataset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        yield endpoint


def test_shards_stream_from_s3_exactly_once_across_ranks_and_workers(s3, tmp_path, monkeypatch):
    bucket = s3.make_bucket("train-data")
    local = tmp_path / "shards"
    n = write_dataset(local, [9, 14, 5, 11])
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options)
    fs.put(str(local) + "/", "train-data/v1/", recursive=True)
    root = f"{bucket}/v1"
    assert read_manifest(root, s3.storage_options).version == read_manifest(str(local)).version
    seen = []
    for rank in range(2):
        ds = StreamingDataset(
            root, "train", 4, rank=rank, world_size=2, num_workers=2,
            collate=ids_collate, storage_options=s3.storage_options,
        )  # fmt: skip
        seen += [i for b in DataLoader(ds, batch_size=None, num_workers=2) for i in b]
    assert sorted(seen) == list(range(n))


def test_a_wrong_bucket_path_is_one_line(s3):
    s3.make_bucket("empty")
    with pytest.raises(DataError, match="s3://empty/nothing/shards.json: no shard manifest"):
        read_manifest("s3://empty/nothing", s3.storage_options)
