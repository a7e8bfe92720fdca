"""A small Transformer over tabular features, for FSDP tests: ``model.name:
fsdp_factory:tiny_transformer`` (the features become a sequence of tokens; its layers are
``kubetrain.models.transformer.EncoderLayer``s, the units FSDP shards one by one)."""

from __future__ import annotations

import torch
from torch import nn

from kubetrain.models.transformer import EncoderLayer, TransformerConfig


class TokensTransformer(nn.Module):
    """``[B, F]`` features -> ``[B, F / token, token]`` tokens -> encoder layers -> mean -> head."""

    def __init__(self, features: int, num_classes: int, token: int, d_model: int, layers: int):
        super().__init__()
        self.token = token
        c = TransformerConfig(d_model=d_model, heads=2, layers=layers, ff=2 * d_model, dropout=0.0)
        self.embed = nn.Linear(token, d_model)
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1).view(x.shape[0], -1, self.token))
        padding = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
        for layer in self.layers:
            h = layer(h, padding)
        return self.head(self.norm(h).mean(1))


def tiny_transformer(spec, num_classes: int, token: int = 8, d_model: int = 16, layers: int = 2):
    features = 1
    for d in spec.shape:
        features *= d
    return TokensTransformer(features, num_classes, token, d_model, layers)
