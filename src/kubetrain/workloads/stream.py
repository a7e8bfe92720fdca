"""Training batches streamed from shards (images, token sequences): the part every streamed
workload shares.

``StreamBatches`` puts a ``kubetrain.data.streaming.StreamingDataset`` behind the trainer's
``TrainBatches`` interface: decoding, augmentation and collation run in ``data.num_workers``
DataLoader worker processes (``batch_size=None``: the dataset batches after its shuffle
buffer), pinned when a GPU trains; a resume continues the epoch with exactly the samples not yet
seen (``StreamingDataset.resume``). Every rank takes ``steps`` optimizer steps per epoch: the
smallest per-rank count (ranks' shares differ by at most one batch per worker), so no rank waits
in an all-reduce that another never joins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from kubetrain.data.streaming import StreamingDataset
from kubetrain.errors import ConfigError
from kubetrain.workloads.base import Batch, TrainBatches


def _as_batch(item: Any) -> Batch:
    inputs, target = item
    return (inputs,), target


class StreamBatches(TrainBatches):
    """A training split streamed as micro-batches of ``dataset.batch_size`` samples.

    Args:
        dataset: this rank's stream (its ``batch_size`` is the micro-batch).
        accum: micro-batches per optimizer step.
        num_workers, prefetch: the DataLoader's worker processes and ``prefetch_factor``.
        unpack: a stream item (what ``dataset.collate`` returns) -> ``(inputs, target)``.
    """

    def __init__(
        self,
        dataset: StreamingDataset,
        accum: int,
        num_workers: int,
        prefetch: int,
        unpack: Callable[[Any], Batch] = _as_batch,
    ) -> None:
        self.dataset, self.accum, self.unpack = dataset, accum, unpack
        self.num_workers, self.prefetch = num_workers, prefetch
        self.micro = dataset.batch_size
        self.steps = dataset.min_batches() // accum  # the same for every epoch (sizes only)
        if self.steps < 1:
            raise ConfigError(
                f"config error: train.batch_size: one optimizer step needs {accum} batch(es) "
                f"of {dataset.batch_size} per process and DataLoader worker, but the smallest "
                f"share of the {dataset.split} split has {dataset.min_batches()}; lower "
                "train.batch_size, train.grad_accum_steps or data.num_workers"
            )
        self._start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if start_step:
            self.dataset.resume(epoch, start_step * self.accum)
        else:
            self.dataset.set_epoch(epoch)
        self._start_step = start_step

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
        for item in loader:
            yield self.unpack(item)
            remaining -= 1
            if remaining == 0:
                return
