"""What the benchmark scripts here share: the CPU they ran on (for their printout and their
RESULTS.md rows) and the summary of repeated measurements. Each script runs as
``python benchmarks/<name>.py``, which puts this folder on ``sys.path``."""

from __future__ import annotations

import platform
import statistics
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name and its widest vector extension (the shared machines here differ:
    some are AVX2-only, some have AVX-512 with bf16, which changes the bf16 and int8 figures)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    first: dict[str, str] = {}  # the first CPU's fields
    for key, _, value in (ln.partition(":") for ln in lines):
        first.setdefault(key.strip(), value.strip())
    name, flags = first.get("model name", platform.machine()), first.get("flags", "").split()
    isa = next((f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags), "")
    return f"{name} ({isa})" if isa else name


def stats(values: list[float]) -> dict[str, float]:
    """Median, min, max and count of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }
