"""Optimizers and per-step learning-rate schedules from the config."""

from __future__ import annotations

import math

import torch

from kubetrain.train.config import TrainConfig


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer, in its fastest implementation for where the parameters live.

    Adam, AdamW and SGD use their fused kernels (one kernel for all parameters instead of a
    Python loop over them; on CPU this is ~25% of a small model's step); RMSprop, which has
    none, the multi-tensor ``foreach`` one. The numbers are those of the default
    implementation up to float rounding.
    """
    params = list(params)
    fused = _fused(params)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            foreach=fused,
        )  # fmt: skip
    foreach = None
    if fused and any(type(p).__name__ == "DTensor" for p in params):
        fused, foreach = None, True  # FSDP-sharded parameters: DTensor has no fused SGD kernel
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True,
        fused=fused, foreach=foreach,
    )  # fmt: skip


def _fused(params: list) -> bool | None:
    """True where fused kernels exist for these parameters (floating point, on CPU or CUDA),
    else None (PyTorch's default choice)."""
    tensors = [p for p in params if isinstance(p, torch.Tensor)]
    supported = tensors and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors
    )
    return True if supported else None


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): a linear warm-up
    (``warmup_steps``, or ``warmup_epochs`` epochs of steps), then the schedule. ``inverse_sqrt``
    continues the warm-up's peak as ``sqrt(warmup / (step + 1))`` ("Attention is all you need";
    without a warm-up it decays from the first step)."""
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps or cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "inverse_sqrt":
        return math.sqrt(max(1, warmup) / (step + 1))
    if cfg.lr_schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if cfg.lr_schedule == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
    return 1.0


def build_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch)
    )
