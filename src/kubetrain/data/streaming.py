"""Streaming a sharded split to training: rank x worker partition, seeded shuffling, exact resume.

Memory does not grow with the dataset: a worker holds one shard and its shuffle buffer.

How an epoch is laid out (every rank computes the same plan from the manifest alone):

1. The split's shards are put in an order seeded by ``(seed, epoch)`` (or kept in order).
2. That order defines one stream of ``N`` sample positions. Rank ``r`` of ``W`` takes the
   contiguous block ``[r*N//W, (r+1)*N//W)``, so it reads only the shards that overlap its block
   (about ``1/W`` of the data), and block sizes differ by at most one.
3. A rank's block is cut the same way into contiguous parts, one per DataLoader worker.
4. Each worker passes its part through a shuffle buffer seeded by ``(seed, epoch, rank,
   worker)``, applies ``transform`` per sample and yields batches of ``batch_size`` (the last
   one may be short).

So across ranks x workers every sample is yielded exactly once per epoch (disjoint and
complete), in an order fixed by the seed and the layout. ``torch.utils.data.DataLoader`` takes
batches from its workers round-robin, which makes the sequence a rank sees deterministic: after
``k`` batches, each worker's share of them is known, and :meth:`StreamingDataset.resume` makes
every worker replay its shuffle buffer on positions only (no reading or decoding) up to that
point, fetch the records still in its buffer, and continue with exactly the samples not yet seen.

Ranks may end an epoch with different batch counts (their blocks differ by up to one sample, and
workers' last batches are short): :meth:`StreamingDataset.max_batches` is the same on every rank,
for a training loop that must take the same number of steps on each.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from kubetrain.data.shards import ShardInfo, ShardManifest, read_manifest, read_shard

Record = dict[str, Any]


def block(start: int, end: int, part: int, parts: int) -> tuple[int, int]:
    """The ``part``-th of ``parts`` contiguous, near-equal blocks of ``[start, end)``."""
    n = end - start
    return start + part * n // parts, start + (part + 1) * n // parts


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's shard order and the stream positions where each ordered shard begins."""

    shards: tuple[ShardInfo, ...]
    starts: tuple[int, ...]  # starts[j]: stream position of shards[j]'s first sample

    @classmethod
    def make(cls, shards: Sequence[ShardInfo], seed: int, epoch: int, shuffle: bool) -> EpochPlan:
        order = (
            np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(shards))
            if shuffle
            else np.arange(len(shards))
        )
        ordered = tuple(shards[int(i)] for i in order)
        starts = np.concatenate([[0], np.cumsum([s.num_samples for s in ordered])])
        return cls(ordered, tuple(int(s) for s in starts))

    @property
    def num_samples(self) -> int:
        return self.starts[-1]

    def locate(self, position: int) -> tuple[int, int]:
        """``(shard index in this plan, row in that shard)`` of a stream position."""
        j = bisect.bisect_right(self.starts, position) - 1
        return j, position - self.starts[j]


class _ShuffleBuffer:
    """A fixed-size shuffle buffer whose random choices depend only on the seed and on how many
    items went in: replaying it on positions gives the same order as running it on records."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        self.items: list[Any] = []

    def push(self, item: Any) -> Any | None:
        """Add ``item``; once full, return a random earlier item in its place (else None)."""
        if self.size <= 1:
            return item
        if len(self.items) < self.size:
            self.items.append(item)
            return None
        j = int(self.rng.integers(self.size))
        out, self.items[j] = self.items[j], item
        return out

    def drain(self) -> list[Any]:
        """The remaining items in a random order; empties the buffer."""
        order = self.rng.permutation(len(self.items))
        out = [self.items[int(j)] for j in order]
        self.items = []
        return out


def round_robin_share(batches_per_worker: Sequence[int], taken: int) -> tuple[list[int], int]:
    """How many of the first ``taken`` batches came from each worker, when a loader takes one
    batch from each worker that still has some, in worker order (DataLoader's in-order mode),
    and which worker's turn is next."""
    share = [0] * len(batches_per_worker)
    turn, left = 0, taken
    while left > 0 and any(s < n for s, n in zip(share, batches_per_worker, strict=True)):
        if share[turn] < batches_per_worker[turn]:
            share[turn] += 1
            left -= 1
        turn = (turn + 1) % len(share)
    return share, turn


class StreamingDataset(IterableDataset):
    """One split of a sharded dataset, streamed as batches; pass it to a ``DataLoader`` with
    ``batch_size=None`` (batching happens in the workers, after the shuffle buffer).

    Args:
        root: the sharded dataset's directory or fsspec URI (where ``shards.json`` is).
        split: which split to stream (``train``, ``val``, ``test``).
        batch_size: samples per batch on this rank.
        rank, world_size: this process's place (default: from ``torch.distributed`` if it is
            initialised, else 0 and 1).
        num_workers: the DataLoader's ``num_workers`` (0 means batches are made in-process).
        seed: fixes shard order and shuffle buffers, together with the epoch.
        shuffle: shuffle shard order and samples (``shuffle_buffer`` samples per worker).
        transform: applied to each record in the worker (decode, augment); returns a sample.
        collate: turns a list of samples into a batch (default: ``default_collate``).
        storage_options: fsspec options (endpoint, credentials) for ``root``.
        manifest: an already read manifest (default: read from ``root``).

    Raises:
        DataError: the manifest or a shard is missing, unreadable or changed.
    """

    def __init__(
        self,
        root: str,
        split: str,
        batch_size: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        transform: Callable[[Record], Any] | None = None,
        collate: Callable[[list[Any]], Any] = default_collate,
        storage_options: Mapping[str, Any] | None = None,
        manifest: ShardManifest | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if rank is None or world_size is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if ready else 0
            world_size = dist.get_world_size() if ready else 1
        self.root, self.split, self.batch_size = root, split, batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(0, num_workers)
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.transform, self.collate = transform, collate
        self.storage_options = dict(storage_options or {})
        self.manifest = manifest or read_manifest(root, self.storage_options)
        self.shards = list(self.manifest.splits.get(split, []))
        self.epoch = 0
        self._skip_batches = 0  # batches of this epoch already consumed (set by resume)

    # -- the plan ---------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (call before iterating, as with a sampler)."""
        self.epoch, self._skip_batches = epoch, 0

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue ``epoch`` after the first ``batches_done`` batches this rank consumed."""
        self.epoch, self._skip_batches = epoch, batches_done

    def state_dict(self, batches_done: int) -> dict[str, int]:
        """What a checkpoint needs to :meth:`resume` (with the loop's batch count)."""
        return {"epoch": self.epoch, "batches_done": batches_done}

    def plan(self) -> EpochPlan:
        return EpochPlan.make(self.shards, self.seed, self.epoch, self.shuffle)

    def _worker_block(self, plan: EpochPlan, rank: int, worker: int) -> tuple[int, int]:
        start, end = block(0, plan.num_samples, rank, self.world_size)
        return block(start, end, worker, max(1, self.num_workers))

    def _worker_batches(self, plan: EpochPlan, rank: int) -> list[int]:
        bs = self.batch_size
        return [
            -(-(b - a) // bs)
            for a, b in (self._worker_block(plan, rank, w) for w in range(max(1, self.num_workers)))
        ]

    def num_batches(self) -> int:
        """Batches this rank yields in the current epoch (from its start)."""
        return sum(self._worker_batches(self.plan(), self.rank))

    def min_batches(self) -> int:
        """The smallest per-rank batch count of the current epoch: the same on every rank (a
        training loop that drops each rank's batches beyond it takes equal steps everywhere)."""
        plan = self.plan()
        return min(sum(self._worker_batches(plan, r)) for r in range(self.world_size))

    def max_batches(self) -> int:
        """The largest per-rank batch count of the current epoch: the same on every rank."""
        plan = self.plan()
        return max(sum(self._worker_batches(plan, r)) for r in range(self.world_size))

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers = max(1, self.num_workers)
        if info is not None and info.num_workers != workers:
            raise ValueError(
                f"StreamingDataset was built for num_workers={self.num_workers} but the "
                f"DataLoader has {info.num_workers}"
            )
        plan = self.plan()
        share, turn = round_robin_share(self._worker_batches(plan, self.rank), self._skip_batches)
        # A new DataLoader asks its worker 0 first: it plays the worker whose turn was next, so
        # the resumed sequence continues the interrupted one's round-robin.
        worker = ((info.id if info is not None else 0) + turn) % workers
        skip = share[worker] * self.batch_size
        samples = self._samples(plan, *self._worker_block(plan, self.rank, worker), skip, worker)
        batch: list[Any] = []
        for record in samples:
            batch.append(self.transform(record) if self.transform else record)
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
        if batch:
            yield self.collate(batch)

    def _samples(self, plan: EpochPlan, start: int, end: int, skip: int, worker: int):
        """Records of stream positions ``[start, end)`` through the shuffle buffer, without the
        first ``skip`` of them; only shards that are still needed are read."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        buf = _ShuffleBuffer(self.shuffle_buffer if self.shuffle else 1, rng)
        position, emitted = start, 0
        # Replay on positions alone until `skip` samples have gone out.
        while emitted < skip and position < end:
            if buf.push(position) is not None:
                emitted += 1
            position += 1
        if emitted < skip:  # the skip ends inside the final drain
            yield from self._fetch(plan, buf.drain()[skip - emitted :])
            return
        buf.items = list(self._fetch(plan, buf.items))
        for record in self._read(plan, position, end):
            out = buf.push(record)
            if out is not None:
                yield out
        yield from buf.drain()

    def _read(self, plan: EpochPlan, start: int, end: int) -> Iterator[Record]:
        """Records of positions ``[start, end)`` in stream order, one shard in memory at a time."""
        if start >= end:
            return
        j, row = plan.locate(start)
        position = start
        while position < end:
            columns = read_shard(self.root, plan.shards[j], self.storage_options)
            rows = plan.shards[j].num_samples
            stop = min(rows, row + end - position)
            for i in range(row, stop):
                yield {k: v[i] for k, v in columns.items()}
            position += stop - row
            j, row = j + 1, 0

    def _fetch(self, plan: EpochPlan, positions: list[int]) -> Iterator[Record]:
        """Records of arbitrary ``positions`` (in that order), reading each shard once."""
        by_shard: dict[int, list[int]] = {}
        for p in positions:
            by_shard.setdefault(plan.locate(p)[0], []).append(p)
        found: dict[int, Record] = {}
        for j, wanted in by_shard.items():
            columns = read_shard(self.root, plan.shards[j], self.storage_options)
            for p in wanted:
                i = p - plan.starts[j]
                found[p] = {k: v[i] for k, v in columns.items()}
        for p in positions:
            yield found[p]
