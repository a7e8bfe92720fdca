"""One rank's trainer: the model and everything its steps and checkpoints need.

A checkpoint is the state of the stateful parts (model, optimizer, schedule, gradient scaler, RNG
states) plus where training stands (epoch, step, the epoch's running loss); ``resume_key`` says
which checkpoints a job may resume from.

Over several processes the model is wrapped in DDP (``train.strategy: ddp``: every rank holds all
of it) or sharded with FSDP2 (``fsdp``: ``kubetrain.train.distributed.shard_model``). Under
``fsdp`` the checkpoints are ``torch.distributed.checkpoint`` directories (every rank writes its
shards; ``kubetrain.train.checkpoint.save_sharded``), also with one process, so a job resumes on
another number of processes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from kubetrain.core.artifacts import DatasetArtifact
from kubetrain.core.distributed import DistContext, any_rank
from kubetrain.core.errors import ConfigError, KubetrainError
from kubetrain.core.records import EpochStats
from kubetrain.tasks.base import Task
from kubetrain.train import checkpoint, instrument
from kubetrain.train.config import TrainConfig
from kubetrain.train.distributed import gathered, local_tensor, shard_model
from kubetrain.train.optim import build_optimizer, build_scheduler

if TYPE_CHECKING:
    from kubetrain.train.config import TrainingConfig


class NonFiniteLoss(KubetrainError):
    """The loss (or the gradients or weights it produced) became NaN or infinite: training
    stops (``kubetrain.train.step`` checks every step, ``Trainer.save_checkpoint`` the weights)."""


def diverged_message(trainer: Trainer, losses: list[torch.Tensor] | None = None) -> str:
    """The one line that says where training diverged, why that usually happens, and what was
    kept. ``losses``: the step's micro-batch losses (None: the weights were found non-finite)."""
    if losses is None:
        what = "the weights became non-finite"
    else:
        loss = float(torch.stack(losses).float().mean())
        if math.isfinite(loss):  # finite here: another rank's loss, or backward, overflowed
            what = f"the gradients became non-finite (loss {loss:.3g})"
        else:
            what = f"the loss became {loss}"
    kept = (
        f"the last good checkpoint is kept in {trainer.checkpoint_dir}"
        if trainer.checkpoint_dir is not None
        else "nothing was saved"
    )
    return (
        f"train error: {what} at epoch {trainer.epoch + 1}, step {trainer.step_in_epoch + 1} "
        f"(optimizer step {trainer.global_step + 1}); training stopped. Usual causes: a learning "
        f"rate too high for this model (train.lr={trainer.tc.lr:g}) or bad input data "
        f"(NaN/inf or extreme feature values); {kept}"
    )


# The data settings that change what a training step sees, besides the dataset version.
AUGMENTATION_FIELDS = {"augment", "augment_shift", "augment_noise", "transforms", "mixup_alpha",
                       "cutmix_alpha"}  # fmt: skip


def resume_key(cfg: TrainingConfig, data: DatasetArtifact) -> str:
    """16 hex digits naming what a training job computes (model, optimisation, augmentation and
    the dataset version), without the fields that only change how it runs
    (``TrainConfig.RUN_ONLY_FIELDS``): a job resumes only checkpoints with its own key, so it may
    resume on another number of processes but never another job's weights."""
    train = cfg.train.model_dump(mode="json", exclude=set(TrainConfig.RUN_ONLY_FIELDS))
    blob = {
        "train": train,
        "model": cfg.model.model_dump(mode="json"),
        "data": cfg.data.model_dump(mode="json", include=AUGMENTATION_FIELDS),
        "dataset": data.version,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision to train in; ``auto`` picks bf16 only where the hardware computes it.

    Raises ConfigError for fp16 without a GPU.
    """
    import logging

    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("config error: train.precision: fp16 needs a GPU (use bf16 or fp32)")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if instrument.cpu_has_native_bf16():
        return "bf16"
    logging.getLogger(__name__).info(
        "train.precision=auto: this CPU has no native bf16 (it would be emulated): fp32"
    )
    return "fp32"


class Trainer:
    """The state of one training job on one rank (built by ``kubetrain.train.loop.fit``)."""

    def __init__(self, cfg: TrainingConfig, task: Task, ctx: DistContext) -> None:
        tc = cfg.train
        data = task.data
        self.cfg, self.data, self.ctx, self.tc = cfg, data, ctx, tc
        self.precision = resolve_precision(tc.precision, ctx.device)
        # FSDP checkpoints (and, over several processes, sharded weights); DDP's otherwise.
        self.sharded = tc.strategy == "fsdp"
        if ctx.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for fp32 matmuls on Ampere+
            torch.backends.cudnn.allow_tf32 = True
        self.task = task
        self._build_model()
        # This rank's share of every global batch of the training split.
        self.batches = self.task.train_batches(tc, ctx)
        self.optimizer = build_optimizer(self.net.parameters(), tc)
        self.scheduler = build_scheduler(self.optimizer, tc, self.batches.steps)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.precision == "fp16")
        self.scaling = self.scaler.is_enabled()
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # One process in fp32: the step needs neither no_sync nor autocast around it.
        self.plain = not ctx.distributed and self.autocast_dtype is None
        # Its gradient tells whether the loss was finite (kubetrain.train.step): a NaN or
        # infinite loss always reaches the output layer's; in the built-in networks that is the
        # last parameter registered (elsewhere, if the loss leaves it without a gradient, the
        # step checks the loss itself).
        self.loss_nearest_parameter = [p for p in self.model.parameters() if p.requires_grad][-1]
        self.monitor = instrument.ResourceMonitor(ctx.device)
        self.flops_per_sample: float | None = None
        self.history: list[EpochStats] = []
        self._history_dicts: list[dict[str, Any]] = []  # history as checkpointed, built once
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.partial: dict[str, Any] = {"loss_sum": 0.0, "count": 0, "seconds": 0.0, "parts": {}}
        self.resume_key = resume_key(cfg, data)
        self.resumed_from: int | None = None
        self.checkpoints_written = 0
        self.checkpoint_seconds = 0.0
        self.checkpoint_dir: Path | None = None
        self.writer = checkpoint.AsyncWriter()

    def _build_model(self) -> None:
        """The network on the device (``model``), and what the step calls (``net``): over
        several processes wrapped in DDP, with a counting comm hook, or sharded in place with
        FSDP2 (``model`` is then the sharded module); compiled if asked."""
        cfg, ctx, tc = self.cfg, self.ctx, self.tc
        torch.manual_seed(tc.seed)  # same initial weights on every rank
        self.model = self.task.prepare_model(self.task.build_model(cfg.model), ctx.device)
        self.net: nn.Module = self.model
        self.comm = instrument.CommStats()
        if ctx.distributed and self.sharded:
            compressed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.grad_compression)
            low = {"bf16": torch.bfloat16}.get(self.precision)
            # bf16: the gathered weights compute in bf16 (FSDP casts them once per step), while
            # gradients are reduced in fp32 unless compression is asked for.
            reduce = compressed or (torch.float32 if low is not None else None)
            shard_model(self.model, param_dtype=low, reduce_dtype=reduce)
        elif ctx.distributed:
            ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
            self.comm = instrument.register_comm_hook(ddp, tc.grad_compression)
            self.net = ddp
        self.compile_seconds: float | None = None
        if tc.compile:
            self.net = cast(nn.Module, torch.compile(self.net))

    def sync_buffers(self) -> None:
        """Under DDP, every rank takes rank 0's buffers (batch-norm running statistics), as DDP
        does at the start of each forward: after an epoch's last step each rank has updated its
        own, and validation and the saved model would otherwise see different statistics on
        each rank (a collective: every rank calls it)."""
        if not self.ctx.distributed or self.sharded:
            return
        import torch.distributed as dist

        for buffer in self.model.buffers():
            dist.broadcast(buffer.data, src=0)

    def whole_model(self) -> contextlib.AbstractContextManager[nn.Module]:
        """Within it, every rank holds the whole model and its forward needs no collective
        (``distributed.gathered`` under FSDP), so validation may run a different number of
        batches on each rank (a streamed split's parts)."""
        if self.sharded and self.ctx.distributed:
            return gathered(self.model)
        return contextlib.nullcontext(self.model)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's autocast context (none in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return functools.partial(torch.autocast, self.ctx.device.type, dtype=self.autocast_dtype)()

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything the next step depends on (what a checkpoint holds)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **self.progress_state(),
        }

    def progress_state(self) -> dict[str, Any]:
        """The state besides the model and the optimizer (a sharded checkpoint keeps those two
        apart): schedule, scaler, RNG states and where training stands."""
        return {
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
        done.extend(h.to_json() for h in self.history[len(done) :])
        return list(done)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's ``state`` (without ``model`` and ``optimizer``: a sharded
        checkpoint has loaded those already)."""
        if "model" in state:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.partial = dict(state["partial"])
        self.history = [EpochStats.model_validate(h) for h in state["history"]]
        self._history_dicts = []
        self.resumed_from = self.global_step

    def save_checkpoint(self, final: bool = False) -> None:
        """Checkpoint the current state (DDP: rank 0 writes, on a background thread unless
        ``final``; FSDP: every rank writes its shards, a collective).

        Raises NonFiniteLoss, on every rank alike, instead of replacing the last good checkpoint
        with non-finite weights.
        """
        if self.checkpoint_dir is None:
            return
        if self.sharded:  # each rank sees its shards only: the ranks agree on the verdict
            finite = all(
                bool(torch.isfinite(local_tensor(p)).all()) for p in self.model.parameters()
            )
            if any_rank(not finite, self.ctx):
                raise NonFiniteLoss(diverged_message(self))
        elif not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise NonFiniteLoss(diverged_message(self))  # the same weights on every rank
        started = time.perf_counter()
        if self.sharded:
            checkpoint.save_sharded(
                self.checkpoint_dir, self.global_step, self.model, self.optimizer,
                self.progress_state(), self.resume_key, self.tc.keep_checkpoints, self.ctx,
            )  # fmt: skip
            self.checkpoints_written += 1
        elif self.ctx.is_main:
            args = (self.checkpoint_dir, self.global_step, self.state(), self.resume_key,
                    self.tc.keep_checkpoints)  # fmt: skip
            if final:  # training is over: written here, without the snapshot a thread needs
                self.writer.wait()
                checkpoint.save(*args)
            else:  # only the snapshot blocks training; a background thread writes the file
                self.writer.submit(*args)
            self.checkpoints_written += 1
        self.checkpoint_seconds += time.perf_counter() - started

    def load_checkpoint(self) -> None:
        """Continue from the newest good checkpoint of this job in ``checkpoint_dir``, if any
        (under FSDP a collective: every rank calls it)."""
        if self.checkpoint_dir is None:
            return
        if self.sharded:
            state = checkpoint.load_latest_sharded(
                self.checkpoint_dir, self.resume_key, self.model, self.optimizer, self.ctx
            )
        else:
            state = checkpoint.load_latest(self.checkpoint_dir, self.resume_key)
        if state is not None:
            self.restore(state)

    def full_state_dict(self) -> dict[str, Any]:
        """The model's whole state dict on the CPU: under FSDP gathered from every rank (a
        collective; rank 0 gets it, the other ranks an empty dict)."""
        if self.sharded and self.ctx.distributed:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.model, options=options)
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
