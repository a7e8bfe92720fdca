"""The ``model`` config section: which network ``kubetrain.models`` builds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kubetrain.config_base import Section


class ModelConfig(Section):
    """Which network to train."""

    name: Literal["mlp", "cnn"] = Field("mlp", description="'mlp' or 'cnn' (image data only).")
    hidden_sizes: list[int] = Field(
        default_factory=lambda: [256, 128], description="MLP hidden layer widths."
    )
    channels: list[int] = Field(
        default_factory=lambda: [32, 64], description="CNN convolution channels."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before each hidden layer.")

    @model_validator(mode="after")
    def _positive_sizes(self) -> ModelConfig:
        for field in ("hidden_sizes", "channels"):
            values = getattr(self, field)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{field} must be a non-empty list of positive integers")
        return self
