"""The ``model`` config section: which network ``kubetrain.models`` builds."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from kubetrain.config_base import Section

BUILTIN = ("mlp", "cnn")
# torchvision:<builder> | timm:<name> | package.module:factory
_EXTERNAL = re.compile(
    r"(torchvision|timm):[A-Za-z0-9_.\-]+|[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*"
)


class ModelConfig(Section):
    """Which network to train."""

    name: str = Field(
        "mlp",
        description="'mlp', 'cnn' (image data only), 'torchvision:<builder>' (any torchvision "
        "classification model, e.g. torchvision:resnet18), 'timm:<name>' (the timm extra), or "
        "'package.module:factory' (your own: called with the input spec, the number of "
        "classes and model.kwargs; returns an nn.Module).",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the torchvision builder, timm model or factory "
        "(hub weights are not downloaded: use model.weights).",
    )
    weights: str | None = Field(
        None,
        description="Initial weights to fine-tune from: a local path or URI of a state dict "
        "(.pt/.pth) or a .safetensors file; a head of another size is replaced.",
    )
    freeze_backbone: bool = Field(
        False, description="Train only the classification head (with model.weights)."
    )
    hidden_sizes: list[int] = Field(
        default_factory=lambda: [256, 128], description="MLP hidden layer widths."
    )
    channels: list[int] = Field(
        default_factory=lambda: [32, 64], description="CNN convolution channels."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before each hidden layer.")

    @field_validator("name")
    @classmethod
    def _known_form(cls, value: str) -> str:
        if value in BUILTIN or _EXTERNAL.fullmatch(value):
            return value
        raise ValueError(
            f"{value!r} is not 'mlp', 'cnn', 'torchvision:<builder>', 'timm:<name>' or "
            "'package.module:factory'"
        )

    @model_validator(mode="after")
    def _positive_sizes(self) -> ModelConfig:
        for field in ("hidden_sizes", "channels"):
            values = getattr(self, field)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{field} must be a non-empty list of positive integers")
        if self.name in BUILTIN:
            # The built-in networks take their sizes from the fields above; silently ignoring
            # these would train something else than asked.
            for field in ("kwargs", "weights", "freeze_backbone"):
                if getattr(self, field):
                    raise ValueError(
                        f"model.{field} applies to torchvision:, timm: and module:factory "
                        f"models, not to {self.name!r}"
                    )
        return self
