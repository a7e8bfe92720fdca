"""The ``evaluate`` config section: the primary metric, the promotion bar and how latency is
measured.

The primary metric depends on the task: ``accuracy`` for classification (tabular, images, text),
``bleu`` for seq2seq unless ``evaluate.metric`` says ``rouge_l`` (summarization). Every metric is
a 0-1 float where higher is better, so one bar (``min_value``) fits them all.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetrain.core.config import Section
from kubetrain.core.errors import ConfigError

# Primary metrics each dataset kind can be judged on (the first is the kind's default).
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "tabular": ("accuracy",),
    "images": ("accuracy", "top5_accuracy"),
    "text_classification": ("accuracy", "macro_f1"),
    "seq2seq": ("bleu", "rouge_l"),
}
METRICS = ("accuracy", "top5_accuracy", "macro_f1", "bleu", "rouge_l")
# Seq2seq: the scores of copying the source unchanged, per metric (in the workload's values).
COPY_BASELINE = {"bleu": "copy_baseline_bleu", "rouge_l": "copy_baseline_rouge_l"}


class EvaluateConfig(Section):
    """The primary metric, efficiency measurements and the promotion bar."""

    metric: Literal[METRICS] | None = Field(  # type: ignore[valid-type]
        None,
        description="The primary metric that the report leads with and the promotion bar "
        "applies to. Default: accuracy for classification, bleu for seq2seq (rouge_l for "
        "summarization). Images may use top5_accuracy, text classification macro_f1.",
    )
    min_value: float | None = Field(
        None,
        ge=0,
        le=1.0,
        description="Promote only if the primary metric (fp32 and int8, on test; 0-1, BLEU "
        "too) reaches this. Default: min_accuracy for classification, 0 for seq2seq (which "
        "must beat the copy-the-source baseline anyway, see beat_copy_baseline).",
    )
    min_accuracy: float = Field(
        0.9,
        ge=0,
        le=1.0,
        description="Classification: the bar on test accuracy when min_value is not set (its "
        "alias; the min_accuracy pipeline parameter).",
    )
    beat_copy_baseline: bool = Field(
        True,
        description="Seq2seq: promote only if the primary metric (fp32 and int8) is above that "
        "of copying the source unchanged.",
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

    def primary_metric(self, kind: str) -> str:
        """The primary metric for a dataset of ``kind`` (``DatasetArtifact.kind``).

        Raises:
            ConfigError: ``evaluate.metric`` does not apply to that kind.
        """
        allowed = KIND_METRICS.get(kind, ("accuracy",))
        if self.metric is None:
            return allowed[0]
        if self.metric not in allowed:
            raise ConfigError(
                f"config error: evaluate.metric: {self.metric!r} does not apply to a {kind} "
                f"dataset (use one of: {', '.join(allowed)})"
            )
        return self.metric

    def bar(self, kind: str) -> float:
        """The promotion bar on the primary metric for a dataset of ``kind``: ``min_value``,
        else ``min_accuracy`` for classification (its alias) and 0 for seq2seq."""
        if self.min_value is not None:
            return self.min_value
        return 0.0 if kind == "seq2seq" else self.min_accuracy
