"""Parallelism applied to a model from outside: FSDP2 sharding (``shard_model``) and the
full-tensor views that code written for a whole model needs (weights digest, agreement of ranks,
gradient norm). Who this process is lives in ``kubetrain.core.distributed``."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from kubetrain.core.distributed import DistContext


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state dict (names and bytes); a sharded (FSDP) tensor counts as
    its full tensor, gathered from every rank (a collective then: all ranks call this)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(full_tensor(tensor).detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def ranks_agree(model: torch.nn.Module, ctx: DistContext) -> bool:
    """True if every rank holds bit-identical weights (under FSDP: the same full tensors once
    gathered, and the same unsharded buffers)."""
    digest = weights_digest(model)
    if not ctx.distributed:
        return True
    gathered: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(gathered, digest)
    return len(set(gathered)) == 1


# -- FSDP2 -----------------------------------------------------------------------------------


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (a parameter, gradient or state of an FSDP-sharded model)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one gathered from every rank (a collective), else itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (no communication), else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules ``shard_model`` gathers one at a time, in order: what the model names
    itself (a ``fsdp_units()`` method: the built-in Transformers return their layers, and a
    user's model may too); else each entry of an ``nn.ModuleList`` (the layers of most other
    Transformers); else each direct child that has parameters. A module whose parameters are shared with another part of the model (a
    tied embedding and output layer) is left to the root's unit: a parameter can belong to one
    unit only."""
    named = getattr(model, "fsdp_units", None)
    units: list[torch.nn.Module] = list(named()) if callable(named) else []
    if not units:
        units = [
            child
            for m in model.modules()
            if isinstance(m, torch.nn.ModuleList)
            for child in m
            if any(True for _ in child.parameters())
        ]
    if not units:
        units = [c for c in model.children() if any(True for _ in c.parameters())]
    # A parameter can belong to one unit only: drop units holding a tied parameter, or one that
    # another candidate unit also holds.
    counts: dict[int, int] = {}
    for unit in units:
        for p in {id(p) for p in unit.parameters()}:
            counts[p] = counts.get(p, 0) + 1
    shared = _shared_parameters(model) | {p for p, n in counts.items() if n > 1}
    return [u for u in units if not any(id(p) in shared for p in u.parameters())]


def _shared_parameters(model: torch.nn.Module) -> set[int]:
    """Ids of parameters registered under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {p for p, n in seen.items() if n > 1}


def shard_model(
    model: torch.nn.Module, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None
) -> list[torch.nn.Module]:
    """Shard ``model`` in place over the default process group with FSDP2 (``fully_shard``):
    each of ``shard_units(model)``, then the root (whatever is left). Parameters, gradients and
    the optimizer state built on them are then sharded DTensors; a unit's parameters are
    gathered for its forward and backward and freed after.

    Args:
        model: the model on its device (the same initial weights on every rank).
        param_dtype: the dtype the gathered parameters compute in (bf16), or None (as stored).
        reduce_dtype: the dtype gradients are reduced in, or None (``param_dtype``'s).

    Returns:
        The units sharded apart from the root.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    units = shard_units(model)
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return units


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within it, the FSDP-sharded ``model`` is whole on every rank: its weights are gathered
    once on entry (a collective) and kept through every forward, so a rank may run more
    forwards than another (no collective inside); sharded again on exit (memory: the whole
    model's weights, as under DDP, for that while)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True)
            unit.reshard()


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``parameters`` to a total norm of ``max_norm``, computed over the
    whole model even when each rank holds a shard of every gradient; returns that norm (a plain
    tensor, the same on every rank)."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = full_tensor(torch.nn.utils.get_total_norm([p.grad for p in parameters]))
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
