"""Sharded test datasets: ids 0..N-1 in shards of chosen (uneven) sizes."""

from __future__ import annotations

import numpy as np

from kubetrain.data.shards import ShardWriter, write_manifest


def ids_collate(batch):
    return [int(r["id"]) for r in batch]


def write_dataset(root, sizes, payload=0, seed=0):
    """Shards of the given sizes (uneven on purpose) holding ids 0..N-1, labels, token arrays."""
    rng = np.random.default_rng(seed)
    writers = []
    with ShardWriter(str(root), "train", max_samples=10**9) as w:
        n = 0
        for size in sizes:
            for _ in range(size):
                w.write({
                    "id": n,
                    "label": n % 3,
                    "tokens": rng.integers(0, 500, rng.integers(1, 9)).astype(np.int64),
                    "blob": bytes(payload),
                })  # fmt: skip
                n += 1
            w.flush()
        writers.append(w)
    write_manifest(str(root), writers)
    return n
