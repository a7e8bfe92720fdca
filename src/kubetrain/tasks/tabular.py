"""Features held in memory (tabular data, small images as columns): the original path.

Batches come from ``kubetrain.data.loader`` (one seeded global permutation per epoch, every
rank's interleaved share of each global batch, so 1 and N processes see the same samples per
step).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from kubetrain.core.records import TabularMeta
from kubetrain.data.loader import ArrayDataset, GlobalBatchSampler, make_train_loader
from kubetrain.tasks.base import Batch, BatchPlan, Scores, Task, TrainBatches

if TYPE_CHECKING:
    from kubetrain.core.distributed import DistContext
    from kubetrain.data.config import DataConfig


class ArrayBatches(TrainBatches):
    """``GlobalBatchSampler`` + ``make_train_loader`` as ``TrainBatches``."""

    def __init__(self, dataset: ArrayDataset, sampler: GlobalBatchSampler, workers: int,
                 prefetch: int) -> None:  # fmt: skip
        self.sampler = sampler
        self.loader = make_train_loader(dataset, sampler, workers, prefetch)
        self.steps, self.micro = sampler.steps, sampler.micro

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.sampler.start_step = start_step

    def __iter__(self) -> Iterator[Batch]:
        for x, y in self.loader:
            yield (x,), y


class TabularTask(Task):
    kind = "tabular"

    def train_batches(self, tc: BatchPlan, ctx: DistContext) -> ArrayBatches:
        cfg, data = self.cfg, self.data
        x_train, y_train = data.split("train")
        augment = None
        if cfg.data.augment and data.is_image:
            augment = {"shift": cfg.data.augment_shift, "noise": cfg.data.augment_noise}
        dataset = ArrayDataset(x_train, y_train, data.input_shape, augment=augment, seed=tc.seed)
        sampler = GlobalBatchSampler(
            len(dataset), tc.batch_size, ctx.world_size, ctx.rank, tc.grad_accum_steps, tc.seed
        )
        return ArrayBatches(dataset, sampler, cfg.data.num_workers, cfg.data.prefetch)

    def validate(self, model: nn.Module, ctx: DistContext) -> tuple[float, float]:
        """Every rank scores the whole (in-memory) split: no collective needed."""
        import torch.nn.functional as F

        x, y = self.data.split("val")
        model.eval()
        loss_sum, correct = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(y), 1024):
                xb = torch.from_numpy(x[start : start + 1024]).view(-1, *self.data.input_shape)
                yb = torch.from_numpy(y[start : start + 1024]).to(ctx.device)
                logits = model(xb.to(ctx.device)).float()
                loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
                correct += (logits.argmax(1) == yb).sum().item()
        model.train()
        return loss_sum / len(y), correct / len(y)

    def examples(self, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.split(split)
        if n < len(y):
            idx = np.sort(np.random.default_rng(seed).permutation(len(y))[:n])
            x, y = x[idx], y[idx]
        return torch.from_numpy(x).view(-1, *self.data.input_shape), torch.from_numpy(y)

    def score(self, model: nn.Module, split: str) -> Scores:
        from kubetrain.tasks import measure

        x, y = self.data.split(split)
        started = time.perf_counter()
        predicted = measure.predict(model, x, self.data.input_shape)
        seconds = time.perf_counter() - started
        values = measure.classification(y, predicted, self.data.classes)
        return Scores("accuracy", values, samples=len(y), seconds=seconds)


def build(cfg: DataConfig, out_dir: str | Path) -> TabularMeta:
    """Preprocess: read, clean, split, normalise (``kubetrain.data.dataset``); returns the meta."""
    from kubetrain.data.dataset import build_dataset

    return build_dataset(cfg, out_dir).meta_of(TabularMeta)
