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
    with torch.inference_mode():
        for start in range(0, len(x), 1024):
            xb = torch.from_numpy(x[start : start + 1024]).view(-1, *input_shape)
            out.append(model(xb).argmax(1).numpy())
    return np.concatenate(out)


def classification(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, per-class accuracy (recall) and the confusion matrix (rows: true class)."""
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
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


def latency_ms(
    model: nn.Module, x: np.ndarray, input_shape: list[int], batch: int, repeats: int
) -> dict[str, float]:
    """Median/min/max wall time of one forward pass on ``batch`` test samples, in ms."""
    reps = -(-batch // len(x))
    xb = torch.from_numpy(np.tile(x, (reps, 1))[:batch]).view(-1, *input_shape)
    times = []
    with torch.inference_mode():
        for _ in range(max(3, repeats // 10)):
            model(xb)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(xb)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}
