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
    beam_size: int = Field(
        1, ge=1, le=64, description="Seq2seq decoding: 1 = greedy, more = beam search width."
    )
    length_penalty: float = Field(
        1.0,
        ge=0,
        description="Beam search ranks finished hypotheses by log-probability / length**this "
        "(0 = raw log-probability, which favours short outputs).",
    )
    max_decode_length: int = Field(
        128, ge=1, description="Most tokens a seq2seq model generates per input."
    )
