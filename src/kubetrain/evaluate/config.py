"""The ``evaluate`` config section: the promotion bar and how latency is measured."""

from __future__ import annotations

from pydantic import Field

from kubetrain.config_base import Section


class EvaluateConfig(Section):
    """Accuracy, efficiency and the promotion bar."""

    min_accuracy: float = Field(
        0.9, ge=0, le=1.0, description="Promote only if test accuracy (fp32 and int8) reaches this."
    )
    latency_batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 64],
        description="Batch sizes at which fp32 and int8 latency are measured side by side.",
    )
    latency_repeats: int = Field(50, ge=3, description="Timed forward passes per measurement.")
