"""The training loop: one code path for 1 process, N processes and N nodes.

The loss of a micro-batch is its mean divided by the accumulation count, and DDP averages
gradients over ranks, so each optimizer step follows the gradient of the mean loss over exactly
``train.batch_size`` samples, whatever the process count and accumulation.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kubetrain.config import PipelineConfig
from kubetrain.data.dataset import DatasetArtifact
from kubetrain.data.loader import ArrayDataset, GlobalBatchSampler, make_train_loader
from kubetrain.errors import ConfigError
from kubetrain.io import atomic_write, write_json
from kubetrain.models import build_model, model_spec
from kubetrain.train.distributed import DistContext, all_reduce_sum, ranks_agree
from kubetrain.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# Called after every epoch with its stats; returning True stops training (trial pruning).
EpochCallback = Callable[["EpochStats"], bool]


class Stopped(Exception):
    """Training was stopped by the epoch callback (e.g. a pruned search trial)."""


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    lr: float
    samples_per_second: float
    data_wait_share: float
    epoch_seconds: float
    step_seconds: float


@dataclass
class FitResult:
    model: nn.Module
    history: list[EpochStats]
    summary: dict[str, Any] = field(default_factory=dict)


def evaluate_split(
    model: nn.Module, x: np.ndarray, y: np.ndarray, input_shape: list[int], device: torch.device
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on one split, in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(y), 1024):
            xb = torch.from_numpy(x[start : start + 1024]).view(-1, *input_shape).to(device)
            yb = torch.from_numpy(y[start : start + 1024]).to(device)
            logits = model(xb)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(1) == yb).sum().item()
    model.train()
    return loss_sum / len(y), correct / len(y)


def fit(
    cfg: PipelineConfig,
    data: DatasetArtifact,
    ctx: DistContext,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train ``cfg.model`` on ``data`` with ``cfg.train``; every rank calls this."""
    tc = cfg.train
    if tc.world_size != ctx.world_size:
        raise ConfigError(
            f"config error: train.nnodes*train.nproc = {tc.world_size} but this job has "
            f"{ctx.world_size} processes"
        )
    x_train, y_train = data.split("train")
    if len(y_train) < tc.batch_size:
        raise ConfigError(
            f"config error: train.batch_size {tc.batch_size} exceeds the {len(y_train)} "
            "training samples"
        )
    torch.manual_seed(tc.seed)  # same initial weights on every rank
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(ctx.device)
    net: nn.Module = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    augment = None
    if cfg.data.augment and data.is_image:
        augment = {"shift": cfg.data.augment_shift, "noise": cfg.data.augment_noise}
    dataset = ArrayDataset(x_train, y_train, data.input_shape, augment=augment, seed=tc.seed)
    sampler = GlobalBatchSampler(
        len(dataset), tc.batch_size, ctx.world_size, ctx.rank, tc.grad_accum_steps, tc.seed
    )
    loader = make_train_loader(dataset, sampler, cfg.data.num_workers)
    optimizer = build_optimizer(net.parameters(), tc)
    scheduler = build_scheduler(optimizer, tc, sampler.steps)
    x_val, y_val = data.split("val")

    history: list[EpochStats] = []
    started = time.perf_counter()
    for epoch in range(tc.epochs):
        stats = _train_epoch(net, loader, sampler, optimizer, scheduler, cfg, ctx, epoch)
        val_loss, val_acc = evaluate_split(model, x_val, y_val, data.input_shape, ctx.device)
        stats.val_loss, stats.val_accuracy = val_loss, val_acc
        history.append(stats)
        if ctx.is_main:
            log.info(
                "epoch %d/%d loss %.4f val_loss %.4f val_acc %.4f lr %.2e %.0f samples/s "
                "data-wait %.1f%%",
                epoch + 1,
                tc.epochs,
                stats.train_loss,
                val_loss,
                val_acc,
                stats.lr,
                stats.samples_per_second,
                100 * stats.data_wait_share,
            )
        if on_epoch is not None and on_epoch(stats):
            raise Stopped(f"stopped after epoch {epoch + 1}")
    total = time.perf_counter() - started
    train_seconds = sum(s.epoch_seconds for s in history)
    steps = sampler.steps * tc.epochs
    summary = {
        "world_size": ctx.world_size,
        "epochs": tc.epochs,
        "steps": steps,
        "samples_seen": steps * tc.batch_size,
        "train_seconds": train_seconds,
        "wall_seconds": total,
        "step_seconds": train_seconds / max(1, steps),
        "samples_per_second": steps * tc.batch_size / max(train_seconds, 1e-9),
        "data_wait_share": float(np.mean([s.data_wait_share for s in history])),
        "final_val_accuracy": history[-1].val_accuracy,
        "best_val_accuracy": max(s.val_accuracy for s in history),
        "final_val_loss": history[-1].val_loss,
        "parameters": sum(p.numel() for p in model.parameters()),
        "ranks_identical": ranks_agree(model, ctx),
    }
    return FitResult(model=model, history=history, summary=summary)


def _train_epoch(net, loader, sampler, optimizer, scheduler, cfg, ctx, epoch) -> EpochStats:
    tc = cfg.train
    accum = tc.grad_accum_steps
    sampler.set_epoch(epoch)
    net.train()
    lr = optimizer.param_groups[0]["lr"]
    loss_sum, count, wait = 0.0, 0, 0.0
    t0 = time.perf_counter()
    batches = iter(loader)
    for _ in range(sampler.steps):
        for micro in range(accum):
            t_wait = time.perf_counter()
            xb, yb = next(batches)
            xb, yb = xb.to(ctx.device, non_blocking=True), yb.to(ctx.device, non_blocking=True)
            wait += time.perf_counter() - t_wait
            # Skip the gradient all-reduce on all but the last micro-batch of a step.
            skip_sync = ctx.distributed and micro < accum - 1
            with net.no_sync() if skip_sync else contextlib.nullcontext():
                loss = F.cross_entropy(net(xb), yb)
                (loss / accum).backward()
            loss_sum += loss.item() * len(yb)
            count += len(yb)
        if tc.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(net.parameters(), tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    loss_total, samples = all_reduce_sum([loss_sum, float(count)], ctx)
    return EpochStats(
        epoch=epoch + 1,
        train_loss=loss_total / max(samples, 1),
        val_loss=float("nan"),
        val_accuracy=float("nan"),
        lr=lr,
        samples_per_second=samples / max(seconds, 1e-9),
        data_wait_share=wait / max(seconds, 1e-9),
        epoch_seconds=seconds,
        step_seconds=seconds / max(1, sampler.steps),
    )


def save_model(
    result: FitResult, cfg: PipelineConfig, data: DatasetArtifact, out_dir: Path
) -> None:
    """Write model.pt (state dict), model.json (how to rebuild it), history.json, metrics.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    atomic_write(out_dir / "model.pt", lambda tmp: torch.save(state, tmp))
    write_json(out_dir / "history.json", [asdict(s) for s in result.history])
    write_json(out_dir / "metrics.json", result.summary)
    spec = model_spec(cfg.model, data.input_shape, data.num_classes)
    spec.update(
        {
            "dataset_version": data.meta["version"],
            "classes": data.meta["classes"],
            "normalization": data.meta["normalization"],
            "train": cfg.train.model_dump(mode="json"),
        }
    )
    write_json(out_dir / "model.json", spec)  # last: marks a complete model artifact
