"""Training metrics, kept apart from the step: per-epoch stats and the run's summary.

``EpochMeter`` is what the step reports into (time waiting for data, in forward/backward, in
the optimizer; the micro-batch losses, left on the device until the epoch or a checkpoint needs
their sum); ``EpochMeter.finish`` turns that into an ``EpochStats``; ``summary`` the epochs into
the run's totals (the model artifact's metrics.json).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from kubetrain.core.distributed import all_reduce_sum, gather_objects
from kubetrain.core.records import EpochStats, TrainSummary
from kubetrain.train import instrument
from kubetrain.train.distributed import ranks_agree
from kubetrain.train.trainer import Trainer


class EpochMeter:
    """What one epoch's steps cost, as the step functions report it."""

    def __init__(self, trainer: Trainer) -> None:
        self.lr = trainer.optimizer.param_groups[0]["lr"]
        self.data_seconds = self.compute_seconds = self.optimizer_seconds = 0.0
        self.steps = 0
        self._comm_calls, self._comm_seconds = trainer.comm.calls, trainer.comm.seconds
        # Micro-batch losses stay on the device, summed once per epoch/checkpoint (no per-step
        # sync; a list append is cheaper than an in-place add on a small model's step).
        self.losses: list[torch.Tensor] = []
        self.sizes: list[int] = []  # samples of each micro-batch loss
        # The named parts of micro-batch losses, with their sample counts (kept on the device
        # like the losses).
        self.parts: list[tuple[dict[str, torch.Tensor], int]] = []
        self._since = time.perf_counter()

    def flush(self, trainer: Trainer) -> None:
        """Add the losses and the time so far to the trainer's running totals (which a
        checkpoint saves), and start counting afresh."""
        partial = trainer.partial
        if self.losses:
            sizes = torch.tensor(self.sizes, dtype=torch.float64)
            partial["loss_sum"] += float(torch.stack(self.losses).double().cpu() @ sizes)
            partial["count"] += int(sizes.sum())
            self.losses.clear()
            self.sizes.clear()
        if self.parts:
            sums = partial.setdefault("parts", {})
            for name in self.parts[0][0]:
                values = torch.stack([p[name] for p, _ in self.parts]).double().cpu()
                sizes = torch.tensor([n for _, n in self.parts], dtype=torch.float64)
                sums[name] = sums.get(name, 0.0) + float(values @ sizes)
            self.parts.clear()
        now = time.perf_counter()
        partial["seconds"] += now - self._since
        self._since = now

    def restart_clock(self) -> None:
        """Time from here on counts (what came since the last flush, e.g. a checkpoint, not)."""
        self._since = time.perf_counter()

    def finish(self, trainer: Trainer) -> EpochStats:
        """The epoch's stats over all ranks (a collective: every rank calls it); validation is
        filled in by the caller."""
        self.flush(trainer)
        ctx, partial = trainer.ctx, trainer.partial
        seconds = partial["seconds"]
        loss_total, samples = all_reduce_sum([partial["loss_sum"], partial["count"]], ctx)
        names = sorted(partial.get("parts") or {})
        part_totals = all_reduce_sum([partial["parts"][n] for n in names], ctx) if names else []
        resources = trainer.monitor.sample()
        per_rank = gather_objects(resources, ctx)
        steps = max(1, trainer.batches.steps)
        stats = EpochStats(
            epoch=trainer.epoch + 1,
            train_loss=loss_total / max(samples, 1),
            val_loss=float("nan"),
            val_accuracy=float("nan"),
            lr=self.lr,
            samples_per_second=samples / max(seconds, 1e-9),
            data_wait_share=self.data_seconds / max(seconds, 1e-9),
            epoch_seconds=seconds,
            step_seconds=seconds / steps,
            compute_seconds=self.compute_seconds,
            optimizer_seconds=self.optimizer_seconds,
            data_seconds=self.data_seconds,
            comm_seconds=trainer.comm.seconds - self._comm_seconds,
            allreduce_calls=trainer.comm.calls - self._comm_calls,
            **resources,
            rank_cpu_percent=[r["cpu_percent"] for r in per_rank],
            rank_peak_rss_mib=[r["peak_rss_mib"] for r in per_rank],
            loss_components={
                n: t / max(samples, 1) for n, t in zip(names, part_totals, strict=True)
            },
        )
        if trainer.flops_per_sample and self.steps:
            per_process = stats.samples_per_second / ctx.world_size
            peak = instrument.peak_flops(ctx.device.type)
            stats.mfu = trainer.flops_per_sample * per_process / peak
        return stats


def summary(trainer: Trainer, wall: float) -> TrainSummary:
    """The run's totals (metrics.json of the model artifact); a collective (``ranks_agree``)."""
    history, tc = trainer.history, trainer.tc
    train_seconds = sum(s.epoch_seconds for s in history)
    steps = trainer.batches.steps * tc.epochs
    mfus = [s.mfu for s in history if s.mfu is not None]
    return TrainSummary(
        **{
            "world_size": trainer.ctx.world_size,
            "epochs": tc.epochs,
            "steps": steps,
            "samples_seen": steps * tc.batch_size,
            "train_seconds": train_seconds,
            "wall_seconds": wall,
            "step_seconds": train_seconds / max(1, steps),
            "samples_per_second": steps * tc.batch_size / max(train_seconds, 1e-9),
            "data_wait_share": float(np.mean([s.data_wait_share for s in history])),
            "compute_share": sum(s.compute_seconds for s in history) / max(train_seconds, 1e-9),
            "optimizer_share": sum(s.optimizer_seconds for s in history) / max(train_seconds, 1e-9),
            "comm_seconds": sum(s.comm_seconds for s in history),
            "allreduce_calls": sum(s.allreduce_calls for s in history),
            "cpu_percent": float(np.mean([s.cpu_percent for s in history])),
            "peak_rss_mib": max(s.peak_rss_mib for s in history),
            "rank_peak_rss_mib": _per_rank([s.rank_peak_rss_mib for s in history], max),
            "rank_cpu_percent": _per_rank([s.rank_cpu_percent for s in history], np.mean),
            "gpu_peak_mib": max((s.gpu_peak_mib or 0 for s in history), default=0) or None,
            "flops_per_sample": trainer.flops_per_sample,
            "mfu": float(np.mean(mfus)) if mfus else None,
            "precision": trainer.precision,
            "compile_seconds": trainer.compile_seconds,
            "checkpoints_written": trainer.checkpoints_written,
            "checkpoint_seconds": trainer.checkpoint_seconds,
            "resumed_from_step": trainer.resumed_from,
            "final_val_accuracy": history[-1].val_accuracy,
            "best_val_accuracy": max(s.val_accuracy for s in history),
            "final_val_loss": history[-1].val_loss,
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "ranks_identical": ranks_agree(trainer.model, trainer.ctx),
            **trainer.task.train_summary(trainer.ctx),
        }
    )


def _per_rank(epochs: list[list[float]], reduce) -> list[float]:
    """``reduce`` of each rank's values over the epochs it took part in: a job resumed on
    another number of processes has epochs with fewer or more ranks."""
    width = max((len(v) for v in epochs), default=0)
    return [float(reduce([v[r] for v in epochs if r < len(v)])) for r in range(width)]
