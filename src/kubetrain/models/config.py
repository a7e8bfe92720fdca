"""The ``model`` config section: which network ``kubetrain.models`` builds."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator, model_validator

from kubetrain.core.config import Section

BUILTIN = ("mlp", "cnn")
# The built-in text models (sized by d_model, heads, layers, ff, max_len below).
TEXT_BUILTIN = ("transformer", "seq2seq_transformer")
HF_PREFIX = "hf:"
FEATURES = ("tabular", "images")  # classification of features or images


@dataclass(frozen=True)
class Family:
    """One kind of model name: what it builds from and the data tasks (``DatasetArtifact.kind``)
    it takes."""

    kinds: tuple[str, ...]
    builtin: bool = False  # sized by this section's fields; kwargs/weights do not apply
    what: str = ""  # how a message names it


# The one table of model names: ``family_of`` parses a name, this says what each family takes;
# the builders (kubetrain.models.networks, .vision, .text, .detection) dispatch on it.
FAMILIES: dict[str, Family] = {
    "mlp": Family(FEATURES, builtin=True),
    "cnn": Family(FEATURES, builtin=True),
    "transformer": Family(("text_classification",), builtin=True, what="a text model"),
    "seq2seq_transformer": Family(("seq2seq",), builtin=True, what="a text model"),
    "torchvision": Family((*FEATURES, "detection"), what="torchvision:<builder>"),
    "timm": Family(FEATURES, what="timm:<name>"),
    "hf": Family(("text_classification", "seq2seq"), what="hf:<directory>"),
    "factory": Family(
        (*FEATURES, "text_classification", "seq2seq", "detection"), what="package.module:factory"
    ),
}


def family_of(name: str) -> str:
    """The family (a key of ``FAMILIES``) of model name ``name``: the one place a name is read."""
    if name in FAMILIES and FAMILIES[name].builtin:
        return name
    if name.startswith(HF_PREFIX):
        return "hf"
    prefix = name.partition(":")[0]
    return prefix if prefix in ("torchvision", "timm") else "factory"


# torchvision:<builder> | timm:<name> | package.module:factory
_EXTERNAL = re.compile(
    r"(torchvision|timm):[A-Za-z0-9_.\-]+|[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*"
)


class ModelConfig(Section):
    """Which network to train."""

    name: str = Field(
        "mlp",
        description="'mlp', 'cnn' (image data only), 'torchvision:<builder>' (any torchvision "
        "classification model, e.g. torchvision:resnet18), 'timm:<name>' (the timm extra), "
        "'transformer' (text_classification: encoder classifier), 'seq2seq_transformer' "
        "(seq2seq: encoder-decoder), 'hf:<directory or URI>' (a Hugging Face transformers "
        "model written by save_pretrained; no hub downloads), or 'package.module:factory' (your "
        "own: called with the input spec, the number of classes and model.kwargs; returns an "
        "nn.Module).",
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
        False,
        description="Train only the classification head (with model.weights); for a detector, "
        "freeze its backbone's body (the FPN and the heads train).",
    )
    hidden_sizes: list[int] = Field(
        default_factory=lambda: [256, 128], description="MLP hidden layer widths."
    )
    channels: list[int] = Field(
        default_factory=lambda: [32, 64], description="CNN convolution channels."
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout before each hidden layer (MLP, CNN); on attention, residual "
        "branches and embeddings (transformer, seq2seq_transformer).",
    )
    d_model: int = Field(128, ge=8, description="Transformer models: token representation width.")
    heads: int = Field(4, ge=1, description="Transformer models: attention heads (divide d_model).")
    layers: int = Field(2, ge=1, description="Transformer models: encoder layers.")
    decoder_layers: int | None = Field(
        None, ge=1, description="seq2seq_transformer: decoder layers (default: layers)."
    )
    ff: int = Field(512, ge=1, description="Transformer models: feed-forward hidden width.")
    max_len: int | None = Field(
        None,
        ge=4,
        description="Transformer models: most positions (default: data.max_length; never below "
        "it). Seq2seq decoding is bounded by it too.",
    )

    @field_validator("name")
    @classmethod
    def _known_form(cls, value: str) -> str:
        if value in BUILTIN or value in TEXT_BUILTIN or _EXTERNAL.fullmatch(value):
            return value
        if value.startswith(HF_PREFIX) and len(value) > len(HF_PREFIX):
            return value
        raise ValueError(
            f"{value!r} is not 'mlp', 'cnn', 'transformer', 'seq2seq_transformer', "
            "'torchvision:<builder>', 'timm:<name>', 'hf:<directory>' or 'package.module:factory'"
        )

    @model_validator(mode="after")
    def _positive_sizes(self) -> ModelConfig:
        for field in ("hidden_sizes", "channels"):
            values = getattr(self, field)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{field} must be a non-empty list of positive integers")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by heads {self.heads}")
        if FAMILIES[family_of(self.name)].builtin:
            # The built-in networks take their sizes from the fields above; silently ignoring
            # these would train something else than asked.
            for field in ("kwargs", "weights", "freeze_backbone"):
                if getattr(self, field):
                    raise ValueError(
                        f"model.{field} applies to torchvision:, timm:, hf: and "
                        f"module:factory models, not to {self.name!r}"
                    )
        return self
