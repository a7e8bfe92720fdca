"""Training batches streamed from shards (images, token sequences): the part every streamed
task shares.

``StreamBatches`` puts a ``kubetrain.data.streaming.StreamingDataset`` behind the trainer's
``TrainBatches`` interface: decoding, augmentation and collation run in ``data.num_workers``
DataLoader worker processes (``batch_size=None``: the dataset batches after its shuffle
buffer), pinned when a GPU trains; a resume continues the epoch with exactly the samples not yet
seen (``StreamingDataset.resume``). Every rank takes ``steps`` optimizer steps per epoch: the
smallest per-rank count (ranks' shares differ by at most one batch per worker), so no rank waits
in an all-reduce that another never joins.

*Windows* (length-bucketed text, :mod:`kubetrain.data.batching`): the stream's items may be
windows, lists of batches (the stream's ``batch_size`` is then the window in samples, and its
``collate`` cuts each window into batches). ``Windows`` says how many batches a window yields:
from its sample count alone (batches of a fixed number of samples: counted from the sizes, like
plain batches), or only by looking (a token budget: lengths decide). In the second case every
rank counts its epoch's batches with a pass over its share of the stream's lengths when the epoch
starts (reading, no padding or tensors), and the ranks agree on the smallest count with one
all-reduce (MIN) per epoch, so again every rank takes the same number of steps. Resuming inside a
window skips that window's first batches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from kubetrain.core.errors import ConfigError
from kubetrain.data.streaming import StreamingDataset, block
from kubetrain.tasks.base import Batch, TrainBatches


def _as_batch(item: Any) -> Batch:
    inputs, target = item
    return (inputs,), target


@dataclass
class Windows:
    """How the stream's windows turn into batches (see the module docstring).

    Attributes:
        per_samples: batches a window of n samples yields, when the count follows from n alone
            (fixed-size batches: ``ceil(n / batch)``); None when only lengths tell.
        count: for ``per_samples=None``: the batches a window's records would give (no tensors).
        agree: for ``per_samples=None``: this rank's batch count of an epoch -> the count every
            rank takes (a collective: an all-reduce MIN over ranks).
    """

    per_samples: Callable[[int], int] | None = None
    count: Callable[[list[Any]], int] | None = None
    agree: Callable[[int], int] | None = None


def _sized_window_counts(
    ds: StreamingDataset, per_samples: Callable[[int], int], rank: int
) -> list[int]:
    """Batches per window of ``rank``'s share of the current epoch, in the loader's order,
    from the sizes alone (each worker's block is cut into windows of ``ds.batch_size``)."""
    plan = ds.plan()
    per_worker = []
    for worker in range(max(1, ds.num_workers)):
        a, b = block(*block(0, plan.num_samples, rank, ds.world_size), worker,
                     max(1, ds.num_workers))  # fmt: skip
        full, rest = divmod(b - a, ds.batch_size)
        per_worker.append(
            [per_samples(n) for n in [ds.batch_size] * full + ([rest] if rest else [])]
        )
    return _round_robin(per_worker)


def _round_robin(per_worker: list[list[int]]) -> list[int]:
    """Items' values in DataLoader order: one from each worker that has any left, in turn."""
    out, i = [], 0
    while any(i < len(w) for w in per_worker):
        out += [w[i] for w in per_worker if i < len(w)]
        i += 1
    return out


class StreamBatches(TrainBatches):
    """A training split streamed as micro-batches of ``dataset.batch_size`` samples.

    Args:
        dataset: this rank's stream (its ``batch_size`` is the micro-batch).
        accum: micro-batches per optimizer step.
        num_workers, prefetch: the DataLoader's worker processes and ``prefetch_factor``.
        unpack: a stream item (what ``dataset.collate`` returns) -> ``(inputs, target)``; with
            ``windows``, one batch of a window.
        windows: the stream's items are windows of batches (see :class:`Windows`).
        micro: nominal samples per micro-batch with ``windows`` (logs, throughput).
    """

    def __init__(
        self,
        dataset: StreamingDataset,
        accum: int,
        num_workers: int,
        prefetch: int,
        unpack: Callable[[Any], Batch] = _as_batch,
        windows: Windows | None = None,
        micro: int | None = None,
    ) -> None:
        self.dataset, self.accum, self.unpack = dataset, accum, unpack
        self.num_workers, self.prefetch = num_workers, prefetch
        self.windows = windows
        self.micro = micro or dataset.batch_size
        self._counts: list[int] | None = None  # batches per window, in loader order
        self._skip = 0  # batches of the first window to skip (a resume inside it)
        self._counted_epoch: int | None = None
        batches = self._epoch_batches()
        self.steps = batches // accum
        if self.steps < 1:
            raise ConfigError(
                f"config error: train.batch_size: one optimizer step needs {accum} batch(es) "
                f"of {self.micro} per process and DataLoader worker, but the smallest "
                f"share of the {dataset.split} split has {batches}; lower "
                "train.batch_size (or batch_tokens), train.grad_accum_steps or data.num_workers"
            )
        self._start_step = 0

    def _window_counts(self) -> list[int]:
        """Batches per window of the current epoch on this rank, in the loader's order."""
        ds, w = self.dataset, self.windows
        assert w is not None  # only with windows: see _epoch_batches
        if w.per_samples is not None:
            return _sized_window_counts(ds, w.per_samples, ds.rank)
        assert w.count is not None, "Windows without per_samples need count"
        counting = copy.copy(ds)
        counting.collate = w.count
        counting.set_epoch(ds.epoch)
        loader = DataLoader(counting, batch_size=None, num_workers=self.num_workers)
        return [int(c) for c in loader]

    def _epoch_batches(self) -> int:
        """Batches every rank takes in the current epoch (the same on all ranks; a collective
        when windows are counted by looking)."""
        if self.windows is None:
            return self.dataset.min_batches()  # the same for every epoch (sizes only)
        self._counts = self._window_counts()
        self._counted_epoch = self.dataset.epoch
        if self.windows.per_samples is not None:
            # From the sizes alone, every rank computes every rank's count: no collective.
            ds = self.dataset
            return min(
                sum(_sized_window_counts(ds, self.windows.per_samples, r))
                for r in range(ds.world_size)
            )
        assert self.windows.agree is not None, "Windows without per_samples need agree"
        return self.windows.agree(sum(self._counts))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        done = start_step * self.accum
        self.dataset.set_epoch(epoch)
        if self.windows is not None:
            # Sized windows give the same counts every epoch (block sizes depend on sizes only);
            # counted ones are counted (and agreed) once per epoch.
            if self.windows.per_samples is None and self._counted_epoch != epoch:
                self.steps = self._epoch_batches() // self.accum
            windows_done = 0
            for count in self._counts or []:
                if done < count:
                    break
                done -= count
                windows_done += 1
            self._skip, done = done, windows_done
        if done:
            self.dataset.resume(epoch, done)
        self._start_step = start_step

    def _items(self, loader: DataLoader) -> Iterator[Any]:
        if self.windows is None:
            yield from loader
            return
        skip = self._skip
        for window in loader:
            yield from window[skip:]
            skip = 0

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=max(1, self.prefetch) if self.num_workers else None,
        )
        remaining = (self.steps - self._start_step) * self.accum
        if remaining <= 0:
            return
        for item in self._items(loader):
            yield self.unpack(item)
            remaining -= 1
            if remaining == 0:
                return
