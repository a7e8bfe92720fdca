"""What a task reads of the configuration: the data and model sections, and how it scores.

``ScoringConfig`` holds the ``evaluate`` fields that decide how a model is *scored* (the primary
metric, how a seq2seq model decodes); ``kubetrain.evaluate.config.EvaluateConfig`` extends it with
the promotion bar and the latency settings. ``TaskConfig`` composes the sections a task is opened
with; the training run's config (``kubetrain.train.config.TrainingConfig``) and, above it, the
whole pipeline's extend it, so every layer receives the same object and reads only its part.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kubetrain.core.config import Section
from kubetrain.core.errors import ConfigError
from kubetrain.data.config import DataConfig
from kubetrain.models.config import ModelConfig

# Primary metrics each dataset kind can be judged on (the first is the kind's default).
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "tabular": ("accuracy",),
    "images": ("accuracy", "top5_accuracy"),
    "text_classification": ("accuracy", "macro_f1"),
    "seq2seq": ("bleu", "rouge_l"),
    "detection": ("map", "map_50"),
}
METRICS = ("accuracy", "top5_accuracy", "macro_f1", "bleu", "rouge_l", "map", "map_50")
# Seq2seq: the scores of copying the source unchanged, per metric (in the task's values).
COPY_BASELINE = {"bleu": "copy_baseline_bleu", "rouge_l": "copy_baseline_rouge_l"}


class ScoringConfig(Section):
    """How a model is scored: the primary metric and how a seq2seq model decodes."""

    metric: Literal[METRICS] | None = Field(  # type: ignore[valid-type]
        None,
        description="The primary metric that the report leads with and the promotion bar "
        "applies to. Default: accuracy for classification, bleu for seq2seq (rouge_l for "
        "summarization), map (COCO AP@[.5:.95]) for detection. Images may use top5_accuracy, "
        "text classification macro_f1, detection map_50 (COCO AP at IoU 0.5).",
    )
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


class TaskConfig(Section):
    """The sections a task is opened with: what the data is, what the model is, how to score."""

    data: DataConfig = Field(default_factory=DataConfig, description=DataConfig.__doc__)
    model: ModelConfig = Field(default_factory=ModelConfig, description=ModelConfig.__doc__)
    evaluate: ScoringConfig = Field(
        default_factory=ScoringConfig, description=ScoringConfig.__doc__
    )

    @model_validator(mode="after")
    def _metric_fits_the_data(self) -> TaskConfig:
        """``evaluate.metric`` must be one the data's kind is scored on; known from the config
        alone for text kinds and a declared ``data.kind`` (tabular or images: either of the
        two with ``auto``), so ``evaluate.metric=bleu`` on classification stops at once."""
        metric = self.evaluate.metric
        # A step's config carries only the sections it reads: without a data section there is
        # no kind to check against (the step that has one checks).
        if metric is None or "data" not in self.model_fields_set:
            return self
        data = self.data
        kind = data.kind if data.kind != "auto" else data.task
        kinds = ("tabular", "images") if kind == "classification" else (kind,)
        allowed = [m for k in kinds for m in KIND_METRICS.get(k, ())]
        if allowed and metric not in allowed:
            what = " or ".join(kinds)
            raise ValueError(
                f"evaluate.metric: {metric!r} does not apply to {what} data (use one of: "
                f"{', '.join(dict.fromkeys(allowed))})"
            )
        return self
