"""The training loop: one code path for 1 process, N processes and N nodes.

``fit`` builds a ``Trainer`` (one rank's model, optimizer, loader and checkpoint state), resumes
it from the newest good checkpoint, and runs epochs of ``train_step`` (``kubetrain.train.step``:
batch production, forward/backward, optimizer step), with the metrics kept apart
(``kubetrain.train.metrics``).

Checkpoints hold everything the next step depends on (weights, optimizer, schedule, gradient
scaler, RNG states, epoch and step), and batches are a pure function of (seed, epoch, step), so a
resumed deterministic CPU run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kubetrain.core.artifacts import TrainedModel
from kubetrain.core.distributed import DistContext
from kubetrain.core.errors import ConfigError
from kubetrain.core.records import EpochStats, ModelSpec, TabularMeta, TrainSummary
from kubetrain.tasks.base import Task
from kubetrain.train import metrics
from kubetrain.train.config import TrainingConfig
from kubetrain.train.metrics import EpochMeter
from kubetrain.train.step import batch_generator, train_step
from kubetrain.train.trainer import (
    NonFiniteLoss,
    Trainer,
    resolve_precision,
    resume_key,
)

__all__ = [
    "EpochCallback", "EpochStats", "FitResult", "NonFiniteLoss", "Stopped", "Trainer",
    "fit", "resolve_precision", "resume_key", "save_model",
]  # fmt: skip

log = logging.getLogger(__name__)

# Called after every epoch with its stats; returning True stops training (trial pruning).
EpochCallback = Callable[[EpochStats], bool]


class Stopped(Exception):
    """Training was stopped by the epoch callback (e.g. a pruned search trial)."""


@dataclass
class FitResult:
    """The trained model, one ``EpochStats`` per epoch and the run's totals.

    ``state_dict``: the model's whole weights on the CPU where ``model`` holds only this rank's
    shards (FSDP over several processes: gathered on rank 0, empty elsewhere); else None.
    """

    model: nn.Module
    history: list[EpochStats]
    summary: TrainSummary
    state_dict: dict[str, Any] | None = None


def fit(
    cfg: TrainingConfig,
    task: Task,
    ctx: DistContext,
    on_epoch: EpochCallback | None = None,
    checkpoint_dir: Path | None = None,
) -> FitResult:
    """Train ``cfg.model`` on ``task``'s data with ``cfg.train``; every rank calls this.

    Args:
        cfg: the training run's config (the pipeline's extends it).
        task: the task of the dataset artifact (``kubetrain.tasks.open_task``).
        ctx: this process's place in the job (``kubetrain.train.distributed.DistContext``).
        on_epoch: called after each epoch; returning True stops training (``Stopped``).
        checkpoint_dir: checkpoints go there every ``train.checkpoint_every_steps`` steps and at
            the end, and (``train.resume``) training continues from the newest good one.

    Returns:
        The model, its history and the run's summary.

    Raises:
        ConfigError: the config does not fit the job or the data.
        NonFiniteLoss: the loss became NaN or infinite (the last good checkpoint is kept).
        Stopped: ``on_epoch`` asked to stop.
    """
    tc = cfg.train
    if tc.world_size != ctx.world_size:
        raise ConfigError(
            f"config error: train.nnodes*train.nproc = {tc.world_size} but this job has "
            f"{ctx.world_size} processes"
        )
    n_train = task.data.meta.num_samples("train")
    if n_train < tc.batch_size:
        raise ConfigError(
            f"config error: train.batch_size {tc.batch_size} exceeds the {n_train} training samples"
        )
    trainer = Trainer(cfg, task, ctx)
    trainer.checkpoint_dir = checkpoint_dir
    if tc.resume:
        trainer.load_checkpoint()
    try:
        return _fit(trainer, on_epoch)
    finally:
        trainer.writer.wait()  # every checkpoint is on disk when fit returns or raises


def _fit(trainer: Trainer, on_epoch: EpochCallback | None) -> FitResult:
    tc, ctx = trainer.tc, trainer.ctx
    started = time.perf_counter()
    while trainer.epoch < tc.epochs:
        stats = _train_epoch(trainer)
        trainer.sync_buffers()
        with trainer.whole_model() as model:  # FSDP: ranks may validate unequal parts
            val_loss, val_acc = trainer.task.validate(model, ctx)
        stats.val_loss, stats.val_accuracy = val_loss, val_acc
        trainer.history.append(stats)
        if ctx.is_main:
            # Named for what the task validates (val_acc, val_token_accuracy, val_map): the
            # number is the one the search reports as val_accuracy whatever it measures.
            metric = "acc" if trainer.task.metric == "accuracy" else trainer.task.metric
            log.info(
                "epoch %d/%d loss %.4f val_loss %.4f val_%s %.4f lr %.2e %.0f samples/s "
                "data-wait %.1f%% cpu %.0f%% rss %.0f MiB",
                stats.epoch, tc.epochs, stats.train_loss, val_loss, metric, val_acc, stats.lr,
                stats.samples_per_second, 100 * stats.data_wait_share, stats.cpu_percent,
                stats.peak_rss_mib,
            )  # fmt: skip
            if stats.loss_components:
                log.info("epoch %d losses: %s", stats.epoch, ", ".join(
                    f"{k} {v:.4f}" for k, v in stats.loss_components.items()))  # fmt: skip
        if on_epoch is not None and on_epoch(stats):
            raise Stopped(f"stopped after epoch {stats.epoch}")
    if trainer.checkpoint_dir is not None and trainer.resumed_from != trainer.global_step:
        trainer.save_checkpoint(final=True)  # the final state, unless we resumed from it
    waited = time.perf_counter()
    trainer.writer.wait()  # the job is not done before its last checkpoint is: that wait counts
    trainer.checkpoint_seconds += time.perf_counter() - waited
    wall = time.perf_counter() - started
    summary = metrics.summary(trainer, wall)
    # Gathered here, where every rank takes part (save_model runs on rank 0 alone).
    whole = trainer.full_state_dict() if trainer.sharded and trainer.ctx.distributed else None
    return FitResult(trainer.model, trainer.history, summary, state_dict=whole)


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


def _train_epoch(trainer: Trainer) -> EpochStats:
    """The rest of the current epoch (from ``step_in_epoch``, after a resume), checkpointing on
    the configured cadence; returns its stats (validation left to the caller)."""
    tc = trainer.tc
    trainer.batches.set_epoch(trainer.epoch, trainer.step_in_epoch)
    trainer.net.train()
    meter = EpochMeter(trainer)
    batches = batch_generator(trainer, meter)
    # KUBETRAIN_PROGRESS=0: no bar even on a terminal (a display choice; see kubetrain.pipeline.config).
    show = (
        trainer.ctx.is_main
        and sys.stderr.isatty()
        and os.environ.get("KUBETRAIN_PROGRESS", "1") != "0"
    )
    with _progress(trainer.batches.steps, trainer.step_in_epoch, trainer.epoch + 1, show) as bar:
        while trainer.step_in_epoch < trainer.batches.steps:
            step_started = time.perf_counter()
            train_step(trainer, batches, meter)
            if tc.compile and trainer.compile_seconds is None:
                trainer.compile_seconds = time.perf_counter() - step_started
            trainer.step_in_epoch += 1
            trainer.global_step += 1
            meter.steps += 1
            if bar is not None:
                bar.update(bar.task_ids[0], completed=trainer.step_in_epoch)
            if tc.checkpoint_every_steps and trainer.global_step % tc.checkpoint_every_steps == 0:
                meter.flush(trainer)
                trainer.save_checkpoint()
                meter.restart_clock()  # checkpoint time is counted apart, not as epoch time
    stats = meter.finish(trainer)
    trainer.epoch += 1
    trainer.step_in_epoch = 0
    trainer.partial = {"loss_sum": 0.0, "count": 0, "seconds": 0.0, "parts": {}}
    return stats


def save_model(result: FitResult, cfg: TrainingConfig, task: Task, out_dir: Path) -> None:
    """Write the model artifact (``kubetrain.core.artifacts.TrainedModel``) to ``out_dir``: the
    weights (whole, unsharded: ``result.state_dict`` after FSDP), how to rebuild the network
    (with the dataset's classes and normalisation), the history and the summary."""
    data = task.data
    spec = ModelSpec(
        **task.model_spec(cfg.model).model_dump(),
        dataset_version=data.version,
        classes=data.meta.classes,
        data_config=cfg.data.model_dump(mode="json"),
        normalization=data.meta.normalization if isinstance(data.meta, TabularMeta) else None,
        train=cfg.train.model_dump(mode="json"),
    )
    TrainedModel(
        path=out_dir,
        spec=spec,
        history=result.history,
        summary=result.summary,
        state_dict=(
            result.state_dict
            if result.state_dict is not None
            else {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
        ),
    ).save(out_dir)
