"""The ``retrain`` config section: scheduled retraining against the promoted-model registry."""

from __future__ import annotations

from pydantic import Field, model_validator

from kubetrain.core.config import Section


class RetrainConfig(Section):
    """Scheduled retraining: skip the work when nothing that shapes the model has changed."""

    only_if_changed: bool = Field(
        False,
        description="Fingerprint the dataset and the config; tune/train/quantize/evaluate run "
        "only if the fingerprint differs from the last promoted model's in registry.",
    )
    registry: str = Field(
        "",
        description="Directory or fsspec URI where promoted models are published "
        "(promoted.json + fp32/int8 models); on a cluster, a path under cluster.mount_path. "
        "Empty: promoted models are kept as pipeline artifacts only.",
    )

    @model_validator(mode="after")
    def _registry_needed(self) -> RetrainConfig:
        if self.only_if_changed and not self.registry:
            raise ValueError("only_if_changed needs retrain.registry (where promotions are kept)")
        return self
