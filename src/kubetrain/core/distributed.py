"""The distributed context: who this process is (rank, world, device), joining the process group
from the variables torchrun sets (a PyTorchJob's and a TrainJob's pods run torchrun too), and
collectives of a few values that the tasks and the trainer agree on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Who this process is: its rank in the world and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (immutable)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(timeout_seconds: float = 120.0) -> DistContext:
    """Join the process group described by RANK/WORLD_SIZE/LOCAL_RANK (gloo on CPU, nccl on GPU).

    ``timeout_seconds`` (``train.collective_timeout_seconds``) bounds the gloo group's set-up and
    collectives. Returns who this process is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl")
        else:
            # Bounded: should the mesh connection ever hang (it did after torchrun restarts,
            # before the launchers gave each round a fresh store), a timeout turns the hang into
            # a failure that the next restart retries.
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_seconds))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum a few floats over ranks (float64, so sums of many samples stay exact enough)."""
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)  # NCCL: on the GPU
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if ``flag`` is true on any rank (a collective: all ranks call it)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([int(flag)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """``obj`` from every rank, in rank order (just ``[obj]`` in one process)."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
