"""One optimizer step, in its parts: batch production, forward/backward, the optimizer step.

The loss of a micro-batch is its mean divided by the accumulation count, and DDP averages
gradients over ranks, so each optimizer step follows the gradient of the mean loss over exactly
``train.batch_size`` samples, whatever the process count and accumulation.

Before the optimizer step the gradients are checked: a NaN or infinite loss makes every gradient
NaN (back-propagation carries it to all of them), and after DDP's all-reduce every rank holds the
same gradients, so every rank stops at the same step with no extra collective (no rank is left
waiting in one) and the weights are never updated with them. Checking one gradient, that of the
parameter nearest the loss, is enough for that and costs microseconds a step (the norm of all of
them costs a tenth of a small model's step); a checkpoint also checks every weight before it is
written, so an overflow that reached the weights another way never replaces a good checkpoint.

Under FSDP (``train.strategy: fsdp``) each rank holds a shard of every gradient: the gradient
norm for clipping is computed over the whole model (``distributed.clip_grad_norm``), and the
ranks agree on the check with one tiny all-reduce (a rank whose shard of that parameter is
empty would otherwise see nothing). Accumulation micro-steps skip the reduce-scatter
(``set_requires_gradient_sync``) as DDP's ``no_sync`` skips the all-reduce.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from kubetrain.core.distributed import any_rank
from kubetrain.tasks.base import Batch
from kubetrain.train import instrument
from kubetrain.train.distributed import clip_grad_norm, local_tensor
from kubetrain.train.metrics import EpochMeter
from kubetrain.train.trainer import NonFiniteLoss, Trainer, diverged_message

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule


def batch_generator(trainer: Trainer, meter: EpochMeter) -> Iterator[Batch]:
    """This rank's micro-batches for the rest of the epoch, on the training device.

    The time spent waiting for each goes to ``meter.data_seconds``.
    """
    device = trainer.ctx.device
    task = trainer.task
    batches = iter(trainer.batches)
    while True:
        started = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        batch = task.to_device(batch, device)
        meter.data_seconds += time.perf_counter() - started
        yield batch


def forward_backward_step(
    trainer: Trainer, batch: Batch, sync_gradients: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Forward and backward of one micro-batch; gradients accumulate in the parameters.

    ``sync_gradients``: False skips DDP's all-reduce (``no_sync``) on all but the last
    micro-batch of a step. Returns the micro-batch's mean loss, detached, on the device, and
    its named parts (``Task.forward_loss``).
    """
    accum, smoothing = trainer.tc.grad_accum_steps, trainer.tc.label_smoothing
    inputs, target = batch
    forward_loss = trainer.task.forward_loss
    if trainer.plain:  # one process, fp32: nothing to wrap the step in
        loss, parts = forward_loss(trainer.net, inputs, target, smoothing)
    elif trainer.sharded and trainer.ctx.distributed:
        cast("FSDPModule", trainer.model).set_requires_gradient_sync(sync_gradients)
        with trainer.autocast():
            loss, parts = forward_loss(trainer.net, inputs, target, smoothing)
    else:
        skip_sync = trainer.ctx.distributed and not sync_gradients
        ddp = cast("nn.parallel.DistributedDataParallel", trainer.net)
        with ddp.no_sync() if skip_sync else contextlib.nullcontext(), trainer.autocast():
            loss, parts = forward_loss(trainer.net, inputs, target, smoothing)
    scaled = loss / accum if accum > 1 else loss
    (trainer.scaler.scale(scaled) if trainer.scaling else scaled).backward()
    return loss.detach(), parts


def optimizer_step(trainer: Trainer, losses: list[torch.Tensor]) -> None:
    """Check, clip and apply the accumulated gradients; advance the schedule; clear them.

    Raises NonFiniteLoss (on every rank alike) instead of stepping with non-finite gradients.
    """
    tc = trainer.tc
    norm = None
    if tc.max_grad_norm:
        if trainer.scaling:
            trainer.scaler.unscale_(trainer.optimizer)
        if trainer.sharded:
            norm = clip_grad_norm(trainer.model.parameters(), tc.max_grad_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(trainer.net.parameters(), tc.max_grad_norm)
    _check_finite(trainer, losses, norm)
    if trainer.scaling:
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
    else:
        trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.ctx.device.type == "cuda":
        torch.cuda.synchronize(trainer.ctx.device)


def _check_finite(trainer: Trainer, losses: list[torch.Tensor], norm: torch.Tensor | None) -> None:
    grad = trainer.loss_nearest_parameter.grad
    if trainer.scaling or (norm is None and grad is None):
        # The loss decides, agreed over ranks: under fp16 infinite gradients are the scaler's to
        # handle (it skips the step and lowers its scale); and a model whose last parameter the
        # loss does not reach (a user's model, a frozen or unused head) has no gradient to read
        # there (the model is the same on every rank, so every rank takes this branch alike).
        bad = any_rank(not bool(torch.isfinite(torch.stack(losses).sum())), trainer.ctx)
    elif norm is not None:  # clipping computed the norm of every gradient anyway
        bad = not bool(torch.isfinite(norm))
    elif trainer.sharded:  # this rank's shard of that gradient (maybe empty): ranks agree
        assert grad is not None  # the first branch takes a step without one
        bad = any_rank(not bool(torch.isfinite(local_tensor(grad)).all()), trainer.ctx)
    else:
        assert grad is not None
        bad = not bool(torch.isfinite(grad).all())
    if bad:
        raise NonFiniteLoss(diverged_message(trainer, losses))


def train_step(trainer: Trainer, batches: Iterator[Batch], meter: EpochMeter):
    """One optimizer step over ``train.grad_accum_steps`` micro-batches from ``batches``.

    Times go to ``meter`` (forward/backward, optimizer), the detached losses to
    ``meter.losses``. Raises NonFiniteLoss if the step's gradients are not finite.
    """
    accum = trainer.tc.grad_accum_steps
    no_sync = trainer.tc.no_sync
    losses = []
    task = trainer.task
    for micro in range(accum):
        batch = next(batches)
        if trainer.flops_per_sample is None:
            with torch.random.fork_rng(devices=[]):  # leaves the RNG stream untouched
                trainer.flops_per_sample = instrument.flops_per_sample(
                    trainer.model, batch, task.forward_loss, task.batch_samples(batch)
                )
        started = time.perf_counter()
        sync = not no_sync or micro == accum - 1
        loss, parts = forward_backward_step(trainer, batch, sync_gradients=sync)
        losses.append(loss)
        meter.sizes.append(task.batch_samples(batch))
        if parts:
            meter.parts.append((parts, meter.sizes[-1]))
        meter.compute_seconds += time.perf_counter() - started
    started = time.perf_counter()
    optimizer_step(trainer, losses)
    meter.optimizer_seconds += time.perf_counter() - started
    meter.losses.extend(losses)
