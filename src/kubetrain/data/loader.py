"""Training batches: sharded per rank, one global batch per optimizer step, optional augmentation.

Every rank draws the same seeded permutation (``DistributedSampler`` semantics) and takes its
interleaved share, so the union of the ranks' micro-batches in step k is exactly the samples a
single process would see in step k. That is what makes 1- and N-process runs agree.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Sized
from typing import cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class ArrayDataset(Dataset):
    """In-memory features/labels; ``__getitems__`` returns a whole micro-batch at once."""

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        input_shape: list[int],
        augment: dict | None = None,
        seed: int = 0,
    ) -> None:
        self.x = torch.from_numpy(np.ascontiguousarray(x)).view(-1, *input_shape)
        self.y = torch.from_numpy(np.ascontiguousarray(y))
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]

    def __getitems__(self, key: tuple):
        """``(epoch, indices[, micro])`` -> the samples, augmented per micro-batch of ``micro``
        (default: all of them). One gather per key; the epoch travels in the key so that it
        reaches the augmentation seed inside persistent worker processes too."""
        epoch, idx, *rest = key
        micro = rest[0] if rest else len(idx)
        x = self.x[idx]
        if self.augment:
            x = torch.cat([
                augment_images(x[j : j + micro], epoch, int(idx[j]), self.seed, **self.augment)
                for j in range(0, len(idx), micro)
            ])  # fmt: skip
        return x, self.y[idx]


def augment_images(
    x: torch.Tensor, epoch: int, first: int, seed: int, shift: int, noise: float
) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (zero fill) and Gaussian noise, per sample.

    Seeded by (seed, epoch, first index of the batch): reproducible for a given process layout.
    """
    g = torch.Generator().manual_seed(hash((seed, epoch, first)) & 0x7FFF_FFFF)
    n = x.shape[0]
    out = x
    if shift > 0:
        h, w = x.shape[-2:]
        padded = torch.nn.functional.pad(x, (shift, shift, shift, shift))
        offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=g)
        # One gather for the whole batch: sample i's window starts at its (dy, dx).
        rows = (offsets[:, 0, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
        cols = (offsets[:, 1, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
        out = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]
        out = out.permute(0, 3, 1, 2).contiguous()  # (n, h, w, C) -> (n, C, h, w)
    if noise > 0:
        out = out + noise * torch.randn(out.shape, generator=g)
    return out


class GlobalBatchSampler(Sampler):
    """Yields this rank's micro-batches: ``steps * accum`` pairs of ``(epoch, index tensor)``.

    Only whole global batches are used (the tail smaller than one global batch is dropped), so
    every rank takes the same number of steps whatever the process count.
    """

    def __init__(
        self, num_samples: int, global_batch: int, world_size: int, rank: int, accum: int, seed: int
    ) -> None:
        self.micro = global_batch // (world_size * accum)
        self.steps = num_samples // global_batch
        self.accum = accum
        self.epoch = 0
        self.start_step = 0  # first step to yield (resuming mid-epoch)
        # The sampler only needs the dataset's length: a range of the sample indices.
        self._sampler: DistributedSampler[int] = DistributedSampler(
            cast("Dataset[int]", range(num_samples)),
            num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
        )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.steps * self.accum

    def indices(self) -> torch.Tensor:
        """This rank's share of the epoch's permutation: ``DistributedSampler``'s (seed +
        epoch, padded to a multiple of the world size, every world_size-th), as one tensor."""
        s = self._sampler
        g = torch.Generator()
        g.manual_seed(s.seed + s.epoch)
        perm = torch.randperm(len(cast("Sized", s.dataset)), generator=g)
        padding = s.total_size - len(perm)
        if padding > 0:
            perm = torch.cat([perm, perm.repeat(-(-padding // len(perm)))[:padding]])
        return perm[s.rank : s.total_size : s.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        indices = self.indices()
        for k in range(self.start_step * self.accum, len(self)):
            yield self.epoch, indices[k * self.micro : (k + 1) * self.micro]


def _identity(batch):
    return batch


class _InProcessLoader:
    """``num_workers=0``, without DataLoader's fetch machinery (which costs more than a small
    model's step): the epoch's samples are gathered at once, so a batch is a slice.

    Augmented batches take real work; with ``prefetch`` > 0 a background thread prepares that
    many of them ahead (torch ops release the GIL, so it works beside the training step),
    pinned when a GPU is present. Plain slices need no thread: one would only cost a hand-off.
    """

    def __init__(self, dataset: ArrayDataset, sampler: GlobalBatchSampler, prefetch: int) -> None:
        self.dataset, self.sampler, self.prefetch = dataset, sampler, prefetch

    def __len__(self) -> int:
        return len(self.sampler)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        keys = list(self.sampler)
        if not keys:
            return
        micro = len(keys[0][1])
        idx = torch.cat([i for _, i in keys])
        x, y = self.dataset.x[idx], self.dataset.y[idx]
        aug = self.dataset.augment
        for j, (epoch, i) in enumerate(keys):
            xb = x[j * micro : (j + 1) * micro]
            if aug:
                xb = augment_images(xb, epoch, int(i[0]), self.dataset.seed, **aug)
            yield xb, y[j * micro : (j + 1) * micro]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.prefetch == 0 or not self.dataset.augment:
            yield from self._batches()
            return
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        pin = torch.cuda.is_available()

        def put(item: object) -> bool:
            """Queue ``item``; False if the training thread left first."""
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    ready.put(item, timeout=0.1)
                    return True
            return False

        def produce() -> None:
            try:
                for x, y in self._batches():
                    if not put((x.pin_memory(), y.pin_memory()) if pin else (x, y)):
                        return
                put(_END)
            except BaseException as err:  # handed to the training thread
                put(err)

        thread = threading.Thread(target=produce, name="kubetrain-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


_END = object()


class _Chunks(Sampler):
    """Groups ``per_chunk`` consecutive micro-batch keys into one ``(epoch, indices, micro)``
    key: a worker process then hands over several batches per transfer."""

    def __init__(self, sampler: GlobalBatchSampler, per_chunk: int) -> None:
        self.sampler, self.per_chunk = sampler, per_chunk

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.per_chunk)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, int]]:
        keys = list(self.sampler)
        for c in range(0, len(keys), self.per_chunk):
            group = keys[c : c + self.per_chunk]
            yield group[0][0], torch.cat([i for _, i in group]), self.sampler.micro


class _ByValue(Dataset):
    """Hands a worker's chunks over as numpy arrays: pickled through the worker's pipe, with no
    shared-memory file and no file-descriptor round trip to the worker per tensor (torch's
    default), which on a busy small CPU costs more than copying the chunk (at most CHUNK_BYTES)."""

    def __init__(self, dataset: ArrayDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, key: tuple) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.dataset.__getitems__(key)
        return x.numpy(), y.numpy()


class _WorkerLoader:
    """``num_workers`` > 0: a DataLoader over chunks of micro-batches (see ``_Chunks``); each
    transfer from a worker costs the main process a fixed price (hand-off, unpickling), which
    for small batches is more than the batch itself. Without a GPU the chunks come by value
    (``_ByValue``); with one, in shared memory, pinned by DataLoader."""

    def __init__(self, dataset: ArrayDataset, sampler: GlobalBatchSampler, workers: int,
                 prefetch: int) -> None:  # fmt: skip
        sample_bytes = dataset.x[0].numel() * dataset.x.element_size()
        per_chunk = max(1, min(CHUNK_BATCHES, CHUNK_BYTES // max(1, sampler.micro * sample_bytes)))
        self.sampler, self.micro = sampler, sampler.micro
        self.by_value = not torch.cuda.is_available()
        self.loader = DataLoader(
            _ByValue(dataset) if self.by_value else dataset,
            batch_sampler=_Chunks(sampler, per_chunk),
            collate_fn=_identity,
            num_workers=workers,
            persistent_workers=True,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=max(1, prefetch),
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            if self.by_value:
                x, y = torch.from_numpy(x), torch.from_numpy(y)
            for j in range(0, len(y), self.micro):
                yield x[j : j + self.micro], y[j : j + self.micro]


CHUNK_BATCHES = 8  # micro-batches per worker transfer, at most
CHUNK_BYTES = 4 << 20  # ... and at most this many bytes of features


def make_train_loader(
    dataset: ArrayDataset, sampler: GlobalBatchSampler, num_workers: int, prefetch: int = 4
) -> _WorkerLoader | _InProcessLoader:
    if num_workers == 0:
        return _InProcessLoader(dataset, sampler, prefetch)
    return _WorkerLoader(dataset, sampler, num_workers, prefetch)
