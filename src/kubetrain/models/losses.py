"""Losses of the text models: label-smoothed cross-entropy over the real (non-padding) positions."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def label_smoothed_loss(
    logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.1, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy with label smoothing over the non-ignored positions.

    Args:
        logits: ``[..., classes]`` (e.g. ``[B,T,V]`` of a decoder).
        targets: ``[...]`` class ids; ``ignore_index`` (the pad id for sequences) is left out.
        smoothing: the share of probability spread evenly over all classes (0 = plain CE).

    Returns:
        A scalar tensor.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=smoothing,
    )


def seq2seq_loss(
    model: Any, src: torch.Tensor, tgt: torch.Tensor, smoothing: float = 0.1
) -> torch.Tensor:
    """Teacher-forced, label-smoothed loss of ``tgt`` (``<s> ... </s>``, padded) given ``src``
    (``model``: a seq2seq model, duck-typed as for ``kubetrain.models.decoding``)."""
    logits = model(src, tgt[:, :-1])
    return label_smoothed_loss(logits, tgt[:, 1:], smoothing, ignore_index=model.pad_id)
