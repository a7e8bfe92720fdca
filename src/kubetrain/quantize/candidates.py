"""Building and measuring one int8 candidate, for every kind of model: the failure rule (under
``auto`` a broken backend is recorded and the others go on; an explicitly named method stops the
step) and the measurements against the fp32 reference (its score, the drop the gate reads, the
size ratios)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from kubetrain.core.errors import KubetrainError
from kubetrain.core.records import Candidate
from kubetrain.quantize.config import QuantizeConfig

log = logging.getLogger(__name__)


@dataclass
class Tried:
    """A candidate as built: its info, its runnable model (None if it failed), its directory."""

    info: Candidate
    model: nn.Module | None
    dir: Path


def attempt(
    name: str, cdir: Path, qcfg: QuantizeConfig, fp32: Candidate,
    build: Callable[[], tuple[Candidate, nn.Module, float]],
) -> Tried:  # fmt: skip
    """Build candidate ``name`` in ``cdir`` with ``build`` (its info, the model reloaded from
    its saved files, that model's validation score) and measure it against ``fp32`` (whose
    ``metric`` and ``val_metric`` are the reference).

    Raises:
        KubetrainError: the build failed and the method was named explicitly (under ``auto``
            the failure is the candidate's ``error``).
    """
    try:
        info, runnable, score = build()
    except Exception as err:
        if qcfg.method != "auto":
            raise KubetrainError(f"quantize: {name} failed: {type(err).__name__}: {err}") from err
        first = (str(err).strip().splitlines() or [""])[0][:200]
        log.warning("quantize: %s failed: %s: %s", name, type(err).__name__, first)
        return Tried(Candidate(name=name, error=f"{type(err).__name__}: {first}"), None, cdir)
    measure_against(info, fp32, score)
    log.info("%s: val %s %.4f (fp32 %.4f)", name, fp32.metric, score, fp32.val_metric or 0.0)
    return Tried(info, runnable, cdir)


def measure_against(info: Candidate, fp32: Candidate, score: float) -> None:
    """A candidate's validation score on the primary metric, its drop against fp32 (the gate's
    ``accuracy_drop``, whatever the metric's name) and its size against fp32's."""
    metric, reference = fp32.metric or "accuracy", fp32.val_metric or 0.0
    info.metric, info.val_metric = metric, score
    if metric == "accuracy":
        info.val_accuracy = score
    info.accuracy_drop = reference - score
    info.size_ratio = (info.size_bytes or 0) / (fp32.size_bytes or 1)
    info.file_ratio = (info.file_bytes or 0) / (fp32.file_bytes or 1)
