"""Length-bucketed batches over StreamingDataset: every sample once, less padding than plain
batches, token budgets kept, and the stream's resume still exact at window boundaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kubetrain.data.batching import (
    BucketingCollate,
    PaddingMeter,
    cut,
    iter_batches,
    pad_collate,
)
from kubetrain.data.shards import ShardWriter, write_manifest
from kubetrain.data.streaming import StreamingDataset

PAD = 0


@pytest.fixture(scope="module")
def token_shards(tmp_path_factory):
    """300 seq2seq-shaped records (rows 0..299) of very uneven lengths, in 5 shards."""
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    with ShardWriter(str(root), "train", max_samples=60, label_column=None) as w:
        for row in range(300):
            # Target lengths follow source lengths, as in translation.
            n = int(rng.integers(1, 60))
            m = max(1, n // 2 + int(rng.integers(-3, 4)))
            w.write({
                "row": row,
                "src_ids": rng.integers(1, 900, n).astype(np.int64),
                "tgt_ids": rng.integers(1, 900, m).astype(np.int64),
            })  # fmt: skip
    write_manifest(str(root), [w])
    return root


def windows(root, collate, *, rank=0, world=1, workers=0, window=64, epoch=0, resume=None):
    ds = StreamingDataset(
        str(root), "train", window, rank=rank, world_size=world, num_workers=workers,
        collate=collate, shuffle_buffer=32, seed=3,
    )  # fmt: skip
    ds.set_epoch(epoch)
    if resume is not None:
        ds.resume(epoch, resume)
    return list(DataLoader(ds, batch_size=None, num_workers=workers))


@pytest.mark.parametrize(
    ("world", "workers"),
    [(1, 0), (2, 0), pytest.param(2, 2, marks=pytest.mark.integration)],  # workers: processes
    ids=str,
)
def test_bucketing_keeps_every_sample_once_and_pads_less(token_shards, world, workers):
    bucketed, plain = PaddingMeter(PAD), PaddingMeter(PAD)
    rows = []
    for rank in range(world):
        for batch in iter_batches(
            windows(token_shards, BucketingCollate(PAD, batch_size=8), rank=rank, world=world,
                    workers=workers)
        ):  # fmt: skip
            bucketed.add(batch)
            rows += batch["row"].tolist()
            assert batch["src_ids"].shape[0] <= 8
        for batch in iter_batches(
            windows(token_shards, BucketingCollate(PAD, batch_size=8, bucket=False), rank=rank,
                    world=world, workers=workers)
        ):  # fmt: skip
            plain.add(batch)
    assert sorted(rows) == list(range(300))  # disjoint and complete
    assert bucketed.share < 0.5 * plain.share  # measured: 0.12-0.15 against 0.42
    assert plain.share > 0.3


def test_token_budget_is_kept_and_long_sequences_go_alone():
    lengths = [(3,), (4,), (4,), (9,), (10,), (30,)]
    groups = cut(lengths, None, batch_tokens=20)
    assert groups == [[0, 1, 2], [3, 4], [5]]
    for g in groups[:-1]:
        assert len(g) * max(lengths[i][0] for i in g) <= 20
    # seq2seq: source and target padded lengths add up.
    assert cut([(3, 2), (3, 2), (3, 5)], None, batch_tokens=16) == [[0, 1], [2]]
    assert cut([(1,)] * 5, 2, None) == [[0, 1], [2, 3], [4]]


def test_token_budget_batches_from_the_stream(token_shards):
    batches = list(iter_batches(windows(token_shards, BucketingCollate(PAD, None, 256))))
    sizes = [b["src_ids"].numel() + b["tgt_ids"].numel() for b in batches]
    assert max(sizes) <= 256
    assert sum(b["row"].numel() for b in batches) == 300
    assert len({b["row"].numel() for b in batches}) > 3  # sizes follow the lengths


def test_batch_order_is_seeded_and_resume_matches(token_shards):
    collate = BucketingCollate(PAD, batch_size=8, seed=1)
    full = windows(token_shards, collate)
    again = windows(token_shards, collate)
    rows = lambda ws: [b["row"].tolist() for b in iter_batches(ws)]  # noqa: E731
    assert rows(full) == rows(again)
    # Interrupted after 2 windows and 3 batches of the third: the rest is what the run had left.
    resumed = windows(token_shards, collate, resume=2)
    done = sum(len(w) for w in full[:2]) + 3
    assert rows(full)[done:] == [b["row"].tolist() for b in iter_batches(resumed, skip=3)]
    assert rows(full) != rows(windows(token_shards, BucketingCollate(PAD, 8, seed=2)))


def test_pad_collate_and_padding_share():
    batch = pad_collate(
        [{"row": 0, "input_ids": np.array([5, 6, 7]), "label": 1},
         {"row": 1, "input_ids": np.array([5]), "label": 0}],
        PAD,
    )  # fmt: skip
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["label"].tolist() == [1, 0] and batch["input_ids"].dtype == torch.long
    meter = PaddingMeter(PAD)
    meter.add(batch)
    assert meter.share == pytest.approx(2 / 6)
