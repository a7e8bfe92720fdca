"""Text metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

from kubetrain.core.errors import DataError
from kubetrain.tasks.text_metrics import (
    accuracy,
    bleu,
    copy_source_baseline,
    macro_f1,
    majority_baseline,
    rouge_l,
)

HYP, REF = "the cat sat on the mat", "the cat sat on a mat"


def test_bleu_by_hand():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3; same length, so no brevity penalty.
    expected = 100 * math.exp(sum(map(math.log, (5 / 6, 3 / 5, 2 / 4, 1 / 3))) / 4)
    assert bleu([HYP], [REF]) == pytest.approx(expected, abs=1e-6)
    assert bleu([REF], [REF]) == pytest.approx(100.0)


def test_rouge_l_by_hand():
    # Longest common subsequence "the cat sat on mat": 5 of 6 tokens on both sides.
    assert rouge_l([HYP], [REF]) == pytest.approx(5 / 6)
    assert rouge_l([HYP, REF], [REF, REF]) == pytest.approx((5 / 6 + 1) / 2)


def test_accuracy_and_macro_f1_by_hand():
    labels, preds = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    assert accuracy(preds, labels) == pytest.approx(3 / 5)
    # per class F1: 0 -> 2*1/(2+2) = 0.5, 1 -> 2*2/(3+2) = 0.8, 2 -> 0
    assert macro_f1(preds, labels) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert macro_f1(preds, labels) == pytest.approx(
        sklearn.f1_score(labels, preds, average="macro")
    )


def test_baselines():
    sources = ["keep this sentence as it is", "and this one too"]
    assert copy_source_baseline(sources, sources) == pytest.approx({"bleu": 100.0, "rouge_l": 1.0})
    scores = copy_source_baseline([HYP], [REF])
    assert scores["bleu"] < 100 and scores["rouge_l"] == pytest.approx(5 / 6)
    assert majority_baseline([1, 1, 2], [1, 2, 2, 1]) == 0.5


@pytest.mark.parametrize("metric", [bleu, rouge_l, accuracy, macro_f1])
def test_mismatched_lengths_are_refused(metric):
    with pytest.raises(DataError, match="1 predictions for 2 references"):
        metric(["a"], ["a", "b"])


def test_numpy_labels_and_empty_input():
    import numpy as np

    assert accuracy(np.array([1, 2]), np.array([1, 1])) == 0.5
    assert majority_baseline(np.array([3, 3, 1]), np.array([3, 1])) == 0.5
    with pytest.raises(DataError, match="no references to score"):
        macro_f1(np.array([]), np.array([]))
