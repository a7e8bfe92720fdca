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


def compare_latency(
    models: dict[str, nn.Module],
    x: np.ndarray,
    input_shape: list[int],
    batch: int,
    repeats: int,
    rounds: int = 5,
) -> dict[str, dict[str, float]]:
    """Latency of several models measured side by side: ``rounds`` rounds, each timing every
    model ``repeats // rounds`` times in turn, so load from other processes hits all alike.
    Returns median/min/max ms of one forward pass per model."""
    reps = -(-batch // len(x))
    xb = torch.from_numpy(np.concatenate([x] * reps)[:batch]).view(-1, *input_shape)
    per_round = max(1, repeats // rounds)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():  # not inference_mode: inductor freezing fails under it
        for model in models.values():  # warm-up (and compile, for compiled models)
            for _ in range(3):
                model(xb)
        for _ in range(rounds):
            for name, model in models.items():
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    model(xb)
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return {
        name: {"median": statistics.median(t), "min": min(t), "max": max(t)}
        for name, t in times.items()
    }
