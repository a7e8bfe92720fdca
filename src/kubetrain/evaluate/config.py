"""The ``evaluate`` config section: the primary metric, the promotion bar and how latency is
measured.

The primary metric depends on the task: ``accuracy`` for classification (tabular, images, text),
``bleu`` for seq2seq unless ``evaluate.metric`` says ``rouge_l`` (summarization), COCO ``map``
(AP@[.5:.95]) for detection unless it says ``map_50``. Every metric is a 0-1 float where higher
is better, so one bar (``min_value``) fits them all.
"""

from __future__ import annotations

from pydantic import Field

from kubetrain.tasks.config import ScoringConfig

# Forward passes on a test batch (of the largest latency batch size) before a model is scored or
# timed (first calls pay for one-off work: a compiled int8 model compiles there): the same for
# both models and both figures.
WARMUP_CALLS = 3


class EvaluateConfig(ScoringConfig):
    """The primary metric, efficiency measurements and the promotion bar (the scoring fields:
    ``ScoringConfig``)."""

    min_value: float | None = Field(
        None,
        ge=0,
        le=1.0,
        description="Promote only if the primary metric (fp32 and int8, on test; 0-1, BLEU "
        "and mAP too) reaches this. Default: min_accuracy for classification, 0 for seq2seq "
        "(which must beat the copy-the-source baseline anyway, see beat_copy_baseline) and for "
        "detection (set a bar: an mAP that a detector which only guesses cannot reach).",
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

    def bar(self, kind: str) -> float:
        """The promotion bar on the primary metric for a dataset of ``kind``: ``min_value``,
        else ``min_accuracy`` for classification (its alias) and 0 for seq2seq and detection."""
        if self.min_value is not None:
            return self.min_value
        return 0.0 if kind in ("seq2seq", "detection") else self.min_accuracy
