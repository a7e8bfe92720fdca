"""Training batches: sharded per rank, one global batch per optimizer step, optional augmentation.

Every rank draws the same seeded permutation (``DistributedSampler`` semantics) and takes its
interleaved share, so the union of the ranks' micro-batches in step k is exactly the samples a
single process would see in step k. That is what makes 1- and N-process runs agree.
"""

from __future__ import annotations

from collections.abc import Iterator

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

    def __getitems__(self, key: tuple[int, torch.Tensor]):
        # The batch sampler yields (epoch, index tensor): one gather per micro-batch, and the
        # epoch reaches the augmentation seed inside persistent worker processes too.
        epoch, idx = key
        x = self.x[idx]
        if self.augment:
            x = augment_images(x, epoch, int(idx[0]), self.seed, **self.augment)
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
        out = torch.empty_like(x)
        for dy, dx in offsets.unique(dim=0).tolist():
            rows = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().squeeze(1)
            out[rows] = padded[rows, :, dy : dy + h, dx : dx + w]
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
        self._sampler = DistributedSampler(
            range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.steps * self.accum

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        indices = torch.tensor(list(self._sampler))
        for k in range(self.start_step * self.accum, len(self)):
            yield self.epoch, indices[k * self.micro : (k + 1) * self.micro]


def _identity(batch):
    return batch


class _InProcessLoader:
    """``num_workers=0``: each micro-batch is one gather, without DataLoader's fetch machinery
    (which costs more than a small model's step on the main thread)."""

    def __init__(self, dataset: ArrayDataset, sampler: GlobalBatchSampler) -> None:
        self.dataset, self.sampler = dataset, sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for key in self.sampler:
            yield self.dataset.__getitems__(key)


def make_train_loader(
    dataset: ArrayDataset, sampler: GlobalBatchSampler, num_workers: int
) -> DataLoader | _InProcessLoader:
    if num_workers == 0:
        return _InProcessLoader(dataset, sampler)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_identity,
        num_workers=num_workers,
        persistent_workers=True,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4,
    )
