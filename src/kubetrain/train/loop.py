"""The training loop: one code path for 1 process, N processes and N nodes.

The loss of a micro-batch is its mean divided by the accumulation count, and DDP averages
gradients over ranks, so each optimizer step follows the gradient of the mean loss over exactly
``train.batch_size`` samples, whatever the process count and accumulation.

Checkpoints hold everything the next step depends on (weights, optimizer, schedule, gradient
scaler, RNG states, epoch and step), and batches are a pure function of (seed, epoch, step), so a
resumed deterministic CPU run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kubetrain.artifacts import DatasetArtifact, TrainedModel
from kubetrain.config import PipelineConfig
from kubetrain.data.loader import ArrayDataset, GlobalBatchSampler, make_train_loader
from kubetrain.errors import ConfigError
from kubetrain.models.networks import build_model, model_spec
from kubetrain.train import checkpoint, instrument
from kubetrain.train.config import TrainConfig
from kubetrain.train.distributed import DistContext, all_reduce_sum, gather_objects, ranks_agree
from kubetrain.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# Called after every epoch with its stats; returning True stops training (trial pruning).
EpochCallback = Callable[["EpochStats"], bool]

# Config fields that do not change what is computed: a checkpoint stays valid across them (so a
# job may resume on another number of processes: batches are global).
_NOT_IN_FINGERPRINT = set(TrainConfig.RUN_ONLY_FIELDS)


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
    compute_seconds: float = 0.0
    optimizer_seconds: float = 0.0
    data_seconds: float = 0.0
    comm_seconds: float = 0.0
    allreduce_calls: int = 0
    cpu_percent: float = 0.0
    peak_rss_mib: float = 0.0
    gpu_percent: float | None = None
    gpu_peak_mib: float | None = None
    mfu: float | None = None
    rank_cpu_percent: list[float] = field(default_factory=list)
    rank_peak_rss_mib: list[float] = field(default_factory=list)


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
            logits = model(xb).float()
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(1) == yb).sum().item()
    model.train()
    return loss_sum / len(y), correct / len(y)


def job_fingerprint(cfg: PipelineConfig, data: DatasetArtifact) -> str:
    """Identifies what a checkpoint computes: model, optimisation, data and its version."""
    train = cfg.train.model_dump(mode="json", exclude=_NOT_IN_FINGERPRINT)
    blob = {
        "train": train,
        "model": cfg.model.model_dump(mode="json"),
        "data": cfg.data.model_dump(
            mode="json", include={"augment", "augment_shift", "augment_noise"}
        ),
        "dataset": data.meta["version"],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision to train in; ``auto`` picks bf16 only where the hardware computes it."""
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("config error: train.precision: fp16 needs a GPU (use bf16 or fp32)")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if instrument.cpu_has_native_bf16():
        return "bf16"
    log.info("train.precision=auto: this CPU has no native bf16 (it would be emulated): fp32")
    return "fp32"


class _Run:
    """The state of one training job on one rank (built by ``fit``)."""

    def __init__(self, cfg: PipelineConfig, data: DatasetArtifact, ctx: DistContext) -> None:
        tc = cfg.train
        self.cfg, self.data, self.ctx, self.tc = cfg, data, ctx, tc
        self.precision = resolve_precision(tc.precision, ctx.device)
        if ctx.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for fp32 matmuls on Ampere+
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(tc.seed)  # same initial weights on every rank
        self.model = build_model(cfg.model, data.input_shape, data.num_classes).to(ctx.device)
        self.net: nn.Module = self.model
        self.comm = instrument.CommStats()
        if ctx.distributed:
            ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
            self.comm = instrument.register_comm_hook(ddp, tc.grad_compression)
            self.net = ddp
        self.compile_seconds: float | None = None
        if tc.compile:
            self.net = torch.compile(self.net)
        x_train, y_train = data.split("train")
        augment = None
        if cfg.data.augment and data.is_image:
            augment = {"shift": cfg.data.augment_shift, "noise": cfg.data.augment_noise}
        self.dataset = ArrayDataset(
            x_train, y_train, data.input_shape, augment=augment, seed=tc.seed
        )
        self.sampler = GlobalBatchSampler(
            len(self.dataset), tc.batch_size, ctx.world_size, ctx.rank, tc.grad_accum_steps,
            tc.seed,
        )  # fmt: skip
        self.loader = make_train_loader(
            self.dataset, self.sampler, cfg.data.num_workers, cfg.data.prefetch
        )
        self.optimizer = build_optimizer(self.net.parameters(), tc)
        self.scheduler = build_scheduler(self.optimizer, tc, self.sampler.steps)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.precision == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.monitor = instrument.ResourceMonitor(ctx.device)
        self.flops_per_sample: float | None = None
        self.history: list[EpochStats] = []
        self._history_dicts: list[dict[str, Any]] = []  # history as checkpointed, built once
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.partial = {"loss_sum": 0.0, "count": 0, "seconds": 0.0}
        self.fingerprint = job_fingerprint(cfg, data)
        self.resumed_from: int | None = None
        self.checkpoints_written = 0
        self.checkpoint_seconds = 0.0
        self.checkpoint_dir: Path | None = None
        self.writer = checkpoint.AsyncWriter()

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "partial": dict(self.partial),
            "history": self._history_state(),
        }

    def _history_state(self) -> list[dict[str, Any]]:
        # A recorded epoch never changes: each is converted once, not at every checkpoint.
        done = self._history_dicts
        done.extend(asdict(h) for h in self.history[len(done) :])
        return list(done)

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.partial = dict(state["partial"])
        self.history = [EpochStats(**h) for h in state["history"]]
        self._history_dicts = []
        self.resumed_from = self.global_step

    def save_checkpoint(self, final: bool = False) -> None:
        if self.checkpoint_dir is None:
            return
        started = time.perf_counter()
        if self.ctx.is_main:
            args = (self.checkpoint_dir, self.global_step, self.state(), self.fingerprint,
                    self.tc.keep_checkpoints)  # fmt: skip
            if final:  # training is over: written here, without the snapshot a thread needs
                self.writer.wait()
                checkpoint.save(*args)
            else:  # only the snapshot blocks training; a background thread writes the file
                self.writer.submit(*args)
            self.checkpoints_written += 1
        self.checkpoint_seconds += time.perf_counter() - started


def fit(
    cfg: PipelineConfig,
    data: DatasetArtifact,
    ctx: DistContext,
    on_epoch: EpochCallback | None = None,
    checkpoint_dir: Path | None = None,
) -> FitResult:
    """Train ``cfg.model`` on ``data`` with ``cfg.train``; every rank calls this.

    With ``checkpoint_dir``, checkpoints are written there every ``train.checkpoint_every_steps``
    steps and at the end, and (``train.resume``) training continues from the newest good one.
    """
    tc = cfg.train
    if tc.world_size != ctx.world_size:
        raise ConfigError(
            f"config error: train.nnodes*train.nproc = {tc.world_size} but this job has "
            f"{ctx.world_size} processes"
        )
    n_train = len(data.split("train")[1])
    if n_train < tc.batch_size:
        raise ConfigError(
            f"config error: train.batch_size {tc.batch_size} exceeds the {n_train} training samples"
        )
    run = _Run(cfg, data, ctx)
    run.checkpoint_dir = checkpoint_dir
    if checkpoint_dir is not None and tc.resume:
        state = checkpoint.load_latest(checkpoint_dir, run.fingerprint)
        if state is not None:
            run.restore(state)
    try:
        return _fit(run, on_epoch)
    finally:
        run.writer.wait()  # every checkpoint is on disk when fit returns or raises


def _fit(run: _Run, on_epoch: EpochCallback | None) -> FitResult:
    tc, ctx, data = run.tc, run.ctx, run.data
    x_val, y_val = data.split("val")
    started = time.perf_counter()
    while run.epoch < tc.epochs:
        stats = _train_epoch(run)
        val_loss, val_acc = evaluate_split(run.model, x_val, y_val, data.input_shape, ctx.device)
        stats.val_loss, stats.val_accuracy = val_loss, val_acc
        run.history.append(stats)
        if ctx.is_main:
            log.info(
                "epoch %d/%d loss %.4f val_loss %.4f val_acc %.4f lr %.2e %.0f samples/s "
                "data-wait %.1f%% cpu %.0f%% rss %.0f MiB",
                stats.epoch, tc.epochs, stats.train_loss, val_loss, val_acc, stats.lr,
                stats.samples_per_second, 100 * stats.data_wait_share, stats.cpu_percent,
                stats.peak_rss_mib,
            )  # fmt: skip
        if on_epoch is not None and on_epoch(stats):
            raise Stopped(f"stopped after epoch {stats.epoch}")
    if run.checkpoint_dir is not None and run.resumed_from != run.global_step:
        run.save_checkpoint(final=True)  # the final state, unless we resumed from it
    waited = time.perf_counter()
    run.writer.wait()  # the job is not done before its last checkpoint is: that wait counts
    run.checkpoint_seconds += time.perf_counter() - waited
    return FitResult(run.model, run.history, _summary(run, time.perf_counter() - started))


def _progress(total: int, first: int, epoch: int, enabled: bool):
    """A terminal progress bar on rank 0 when stderr is a TTY; plain log lines otherwise."""
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    progress = Progress(
        "epoch " + str(epoch), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        transient=True,
    )  # fmt: skip
    progress.add_task("train", total=total, completed=first)
    return progress


def _flush_losses(run: _Run, losses: list[torch.Tensor]) -> None:
    """Add the micro-batch mean losses (each over ``micro`` samples) and their sample count to
    the epoch's running totals, and empty the list."""
    if losses:
        micro = run.sampler.micro
        run.partial["loss_sum"] += float(torch.stack(losses).double().sum()) * micro
        run.partial["count"] += len(losses) * micro
        losses.clear()


def _train_epoch(run: _Run) -> EpochStats:
    tc, ctx = run.tc, run.ctx
    accum = tc.grad_accum_steps
    run.sampler.set_epoch(run.epoch)
    run.sampler.start_step = run.step_in_epoch
    run.net.train()
    lr = run.optimizer.param_groups[0]["lr"]
    wait = compute = optim = 0.0
    comm_calls, comm_secs = run.comm.calls, run.comm.seconds
    steps_done = 0
    scaling = run.scaler.is_enabled()
    # Micro-batch losses stay on the device, summed once per epoch/checkpoint (no per-step sync;
    # a list append is cheaper than an in-place add on a small model's step).
    losses: list[torch.Tensor] = []
    if run.autocast_dtype is None:
        autocast = contextlib.nullcontext
    else:
        autocast = functools.partial(torch.autocast, ctx.device.type, dtype=run.autocast_dtype)
    to_device = ctx.device.type != "cpu"
    plain = not ctx.distributed and run.autocast_dtype is None
    t0 = time.perf_counter()
    batches = iter(run.loader)
    show = ctx.is_main and sys.stderr.isatty() and os.environ.get("KUBETRAIN_PROGRESS", "1") != "0"
    with _progress(run.sampler.steps, run.step_in_epoch, run.epoch + 1, show) as bar:
        while run.step_in_epoch < run.sampler.steps:
            step_started = time.perf_counter()
            for micro in range(accum):
                t_wait = time.perf_counter()
                xb, yb = next(batches)
                if to_device:
                    xb = xb.to(ctx.device, non_blocking=True)
                    yb = yb.to(ctx.device, non_blocking=True)
                t_compute = time.perf_counter()
                wait += t_compute - t_wait
                if run.flops_per_sample is None:
                    with torch.random.fork_rng(devices=[]):  # leaves the RNG stream untouched
                        run.flops_per_sample = instrument.flops_per_sample(run.model, xb, yb)
                    t_compute = time.perf_counter()
                if plain:  # one process, fp32: nothing to wrap the step in
                    loss = F.cross_entropy(run.net(xb), yb)
                else:
                    # Skip the gradient all-reduce on all but the last micro-batch of a step.
                    skip_sync = ctx.distributed and tc.no_sync and micro < accum - 1
                    with (
                        run.net.no_sync() if skip_sync else contextlib.nullcontext(),
                        autocast(),
                    ):
                        loss = F.cross_entropy(run.net(xb).float(), yb)
                scaled = loss / accum if accum > 1 else loss
                (run.scaler.scale(scaled) if scaling else scaled).backward()
                losses.append(loss.detach())
                compute += time.perf_counter() - t_compute
            t_optim = time.perf_counter()
            if tc.max_grad_norm:
                if scaling:
                    run.scaler.unscale_(run.optimizer)
                torch.nn.utils.clip_grad_norm_(run.net.parameters(), tc.max_grad_norm)
            if scaling:
                run.scaler.step(run.optimizer)
                run.scaler.update()
            else:
                run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            optim += time.perf_counter() - t_optim
            if tc.compile and run.compile_seconds is None:
                run.compile_seconds = time.perf_counter() - step_started
            run.step_in_epoch += 1
            run.global_step += 1
            steps_done += 1
            if bar is not None:
                bar.update(bar.task_ids[0], completed=run.step_in_epoch)
            if tc.checkpoint_every_steps and run.global_step % tc.checkpoint_every_steps == 0:
                _flush_losses(run, losses)
                run.partial["seconds"] += time.perf_counter() - t0
                run.save_checkpoint()
                t0 = time.perf_counter()
    seconds = run.partial["seconds"] + time.perf_counter() - t0
    _flush_losses(run, losses)
    loss_total, samples = all_reduce_sum([run.partial["loss_sum"], run.partial["count"]], ctx)
    resources = run.monitor.sample()
    per_rank = gather_objects(resources, ctx)
    steps = max(1, run.sampler.steps)
    run.epoch += 1
    run.step_in_epoch = 0
    run.partial = {"loss_sum": 0.0, "count": 0, "seconds": 0.0}
    stats = EpochStats(
        epoch=run.epoch,
        train_loss=loss_total / max(samples, 1),
        val_loss=float("nan"),
        val_accuracy=float("nan"),
        lr=lr,
        samples_per_second=samples / max(seconds, 1e-9),
        data_wait_share=wait / max(seconds, 1e-9),
        epoch_seconds=seconds,
        step_seconds=seconds / steps,
        compute_seconds=compute,
        optimizer_seconds=optim,
        data_seconds=wait,
        comm_seconds=run.comm.seconds - comm_secs,
        allreduce_calls=run.comm.calls - comm_calls,
        **resources,
        rank_cpu_percent=[r["cpu_percent"] for r in per_rank],
        rank_peak_rss_mib=[r["peak_rss_mib"] for r in per_rank],
    )
    if run.flops_per_sample and steps_done:
        per_rank = stats.samples_per_second / ctx.world_size
        peak = instrument.peak_flops(ctx.device.type)
        stats.mfu = run.flops_per_sample * per_rank / peak
    return stats


def _summary(run: _Run, wall: float) -> dict[str, Any]:
    history, tc = run.history, run.tc
    train_seconds = sum(s.epoch_seconds for s in history)
    steps = run.sampler.steps * tc.epochs
    mfus = [s.mfu for s in history if s.mfu is not None]
    return {
        "world_size": run.ctx.world_size,
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
        "rank_peak_rss_mib": [
            max(v) for v in zip(*(s.rank_peak_rss_mib for s in history), strict=True)
        ],
        "rank_cpu_percent": [
            float(np.mean(v)) for v in zip(*(s.rank_cpu_percent for s in history), strict=True)
        ],
        "gpu_peak_mib": max((s.gpu_peak_mib or 0 for s in history), default=0) or None,
        "flops_per_sample": run.flops_per_sample,
        "mfu": float(np.mean(mfus)) if mfus else None,
        "precision": run.precision,
        "compile_seconds": run.compile_seconds,
        "checkpoints_written": run.checkpoints_written,
        "checkpoint_seconds": run.checkpoint_seconds,
        "resumed_from_step": run.resumed_from,
        "final_val_accuracy": history[-1].val_accuracy,
        "best_val_accuracy": max(s.val_accuracy for s in history),
        "final_val_loss": history[-1].val_loss,
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "ranks_identical": ranks_agree(run.model, run.ctx),
    }


def save_model(
    result: FitResult, cfg: PipelineConfig, data: DatasetArtifact, out_dir: Path
) -> None:
    """Write the model artifact (``kubetrain.artifacts.TrainedModel``) to ``out_dir``."""
    spec = model_spec(cfg.model, data.input_shape, data.num_classes)
    spec.update(
        {
            "dataset_version": data.meta["version"],
            "classes": data.meta["classes"],
            "normalization": data.meta["normalization"],
            "train": cfg.train.model_dump(mode="json"),
        }
    )
    TrainedModel(
        path=out_dir,
        spec=spec,
        history=[asdict(s) for s in result.history],
        summary=result.summary,
        state_dict={k: v.detach().cpu() for k, v in result.model.state_dict().items()},
    ).save(out_dir)
