"""What a training step costs: time split, communication, CPU/GPU use, memory, FLOPs and MFU."""

from __future__ import annotations

import functools
import logging
import resource
import time
from dataclasses import dataclass

import psutil
import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class CommStats:
    """All-reduce calls (one per gradient bucket) and their wall time, counted by a DDP hook."""

    calls: int = 0
    seconds: float = 0.0


def register_comm_hook(ddp: nn.parallel.DistributedDataParallel, compression: str) -> CommStats:
    """Wrap DDP's all-reduce (optionally bf16/fp16-compressed) with a counter and a timer."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks as hooks

    base = {
        "none": hooks.allreduce_hook,
        "fp16": hooks.fp16_compress_hook,
        "bf16": hooks.bf16_compress_hook,
    }[compression]
    stats = CommStats()

    def counted(state, bucket):
        stats.calls += 1
        started = time.perf_counter()

        def finished(fut):
            stats.seconds += time.perf_counter() - started
            return fut.value()

        return base(state, bucket).then(finished)

    ddp.register_comm_hook(None, counted)
    return stats


class ResourceMonitor:
    """CPU utilisation (100 = one core busy) and peak memory of this process, per epoch."""

    def __init__(self, device: torch.device) -> None:
        self.process = psutil.Process()
        self.device = device
        self._start()

    def _start(self) -> None:
        times = self.process.cpu_times()
        self._cpu = times.user + times.system
        self._wall = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def sample(self) -> dict[str, float | None]:
        times = self.process.cpu_times()
        wall = time.perf_counter() - self._wall
        out: dict[str, float | None] = {
            "cpu_percent": 100.0 * (times.user + times.system - self._cpu) / max(wall, 1e-9),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "gpu_percent": None,
            "gpu_peak_mib": None,
        }
        if self.device.type == "cuda":
            out["gpu_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            try:
                out["gpu_percent"] = float(torch.cuda.utilization(self.device))
            except Exception:
                out["gpu_percent"] = None
        self._start()
        return out


def flops_per_sample(model: nn.Module, batch, forward_loss, samples: int) -> float:
    """FLOPs of forward + backward per sample of ``batch`` (``(inputs, target)``, ``samples``
    of them) under ``forward_loss(model, inputs, target)`` (``Task.forward_loss``: the loss
    first), counted by ``torch.utils.flop_counter`` (ops it has no formula for, such as
    torchvision's ``roi_align`` and ``nms``, count as none)."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs, target = batch
    # The counting pass must leave no trace: a batch norm's running statistics would take this
    # batch twice, and a resumed run (which counts on another batch) would end elsewhere.
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    counter = FlopCounterMode(display=False)
    with counter:
        loss = forward_loss(model, inputs, target)[0]
        loss.backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, value in model.named_buffers():
            value.copy_(buffers[name])
    return counter.get_total_flops() / max(1, samples)


@functools.cache
def peak_flops(device_type: str, dtype: torch.dtype = torch.float32) -> float:
    """Measured dense-GEMM FLOP/s of this process's device and thread count (the MFU divisor)."""
    n = 2048 if device_type == "cuda" else 512
    device = torch.device(device_type)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 50 if device_type == "cuda" else 5
    if device_type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device_type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - started)


def cpu_has_native_bf16() -> bool:
    """True if the CPU computes bf16 in hardware (AVX512-BF16 or AMX); else bf16 is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
