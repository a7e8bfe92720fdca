"""Accuracy and efficiency of a model on the test split."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch
from torch import nn


def predict(model: nn.Module, x: np.ndarray, input_shape: list[int]) -> np.ndarray:
    out = []
    with torch.no_grad():  # not inference_mode: inductor freezing fails under it
        for start in range(0, len(x), 1024):
            xb = torch.from_numpy(x[start : start + 1024]).view(-1, *input_shape)
            out.append(model(xb).argmax(1).numpy())
    return np.concatenate(out)


def classification(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, per-class accuracy (recall) and the confusion matrix (rows: true class)."""
    k = len(classes)
    matrix = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    support = matrix.sum(axis=1)
    per_class = {
        name: (float(matrix[i, i] / support[i]) if support[i] else None)
        for i, name in enumerate(classes)
    }
    return {
        "accuracy": float((y_true == y_pred).mean()),
        "per_class_accuracy": per_class,
        "confusion_matrix": matrix.tolist(),
    }


Inputs = tuple[torch.Tensor, ...]


def latency_inputs(x: torch.Tensor, y: torch.Tensor, kind: str) -> Inputs:
    """The positional inputs of one forward pass for ``task.examples``' ``(x, y)``: ``(x,)``
    (features, images or token ids), and for ``seq2seq`` the teacher-forced ``(source,
    target without its last token)``, the way the model is called in training."""
    if kind == "seq2seq":
        return (x, y[:, :-1])
    return (x,)


def as_batch(x: np.ndarray | torch.Tensor | Inputs, input_shape: list[int] | None,
             batch: int) -> Inputs:  # fmt: skip
    """``batch`` rows of the inputs ``x`` (repeated if there are fewer), as a tuple of tensors.

    ``x``: a numpy array of flat features (viewed as ``input_shape``), a tensor, or a tuple of
    tensors with the same first dimension (e.g. source and target token ids, int64).
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
        if input_shape is not None:
            x = x.view(-1, *input_shape)
    inputs = (x,) if isinstance(x, torch.Tensor) else tuple(x)
    reps = -(-batch // len(inputs[0]))
    return tuple(t.repeat(reps, *([1] * (t.dim() - 1)))[:batch] for t in inputs)


def tokens_in(inputs: Inputs) -> int:
    """Token positions in a batch of inputs: the elements of its integer (token id) tensors;
    0 for float inputs (features, images)."""
    return sum(t.numel() for t in inputs if not t.is_floating_point())


def compare_latency(
    models: dict[str, nn.Module],
    x: np.ndarray | torch.Tensor | Inputs,
    input_shape: list[int] | None,
    batch: int,
    repeats: int,
    rounds: int = 5,
) -> dict[str, dict[str, float]]:
    """Latency of several models measured side by side: ``rounds`` rounds, each timing every
    model ``repeats // rounds`` times in turn, so load from other processes hits all alike.

    Args:
        models: name -> model, each called as ``model(*inputs)``.
        x: example inputs (``as_batch``): flat features with ``input_shape``, a tensor, or a
            tuple of tensors (token ids are int64).
        input_shape: the shape of one sample of flat features (None for tensors).
        batch: the batch size timed.
        repeats: timed forward passes per model.

    Returns:
        Per model, median/min/max ms of one forward pass, and ``tokens`` (token positions per
        batch, 0 for float inputs).
    """
    xb = as_batch(x, input_shape, batch)
    per_round = max(1, repeats // rounds)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():  # not inference_mode: inductor freezing fails under it
        for model in models.values():  # warm-up (and compile, for compiled models)
            for _ in range(3):
                model(*xb)
        for _ in range(rounds):
            for name, model in models.items():
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    model(*xb)
                    times[name].append((time.perf_counter() - t0) * 1e3)
    tokens = tokens_in(xb)
    return {
        name: {"median": statistics.median(t), "min": min(t), "max": max(t), "tokens": tokens}
        for name, t in times.items()
    }
