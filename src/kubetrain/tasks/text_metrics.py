"""Metrics of text tasks: BLEU and ROUGE-L for seq2seq (the standard implementations, sacrebleu
and rouge-score), accuracy and macro-F1 for classification, and the copy-the-source baseline a
seq2seq model has to beat.

BLEU is sacrebleu's corpus BLEU (0-100) with its default ``13a`` tokenizer; ROUGE-L is the mean
F-measure of rouge-score's ``rougeL`` with stemming, scaled 0-1. rouge-score's tokenizer keeps
only ``[a-z0-9]`` runs, so ROUGE-L is meant for English (summarization); use BLEU for
translation into other languages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kubetrain.core.errors import DataError


def _same_length(hyps: Sequence, refs: Sequence) -> None:
    if len(hyps) != len(refs):
        raise DataError(f"{len(hyps)} predictions for {len(refs)} references")
    if len(refs) == 0:
        raise DataError("no references to score")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) of ``hypotheses`` against one reference each.

    Raises:
        DataError: the lists differ in length or are empty.
    """
    import sacrebleu

    _same_length(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, stemmed, 0-1) of ``hypotheses`` against references.

    Raises:
        DataError: the lists differ in length or are empty.
    """
    from rouge_score import rouge_scorer

    _same_length(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references, strict=False)
    ]
    return float(np.mean(scores))


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Share of predictions equal to their label.

    Raises:
        DataError: the lists differ in length or are empty.
    """
    _same_length(predictions, labels)
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over every class seen in labels or predictions (a class
    with no true and no predicted sample cannot occur; one never predicted scores 0), as
    scikit-learn's ``f1_score(average="macro")``.

    Raises:
        DataError: the lists differ in length or are empty.
    """
    _same_length(predictions, labels)
    p, y = np.asarray(predictions), np.asarray(labels)
    f1s = []
    for c in np.union1d(p, y):
        tp = np.sum((p == c) & (y == c))
        denom = np.sum(p == c) + np.sum(y == c)
        f1s.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1s))


def seq2seq_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{"bleu": ..., "rouge_l": ...}`` of ``hypotheses`` against ``references``."""
    return {"bleu": bleu(hypotheses, references), "rouge_l": rouge_l(hypotheses, references)}


def copy_source_baseline(sources: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The scores of a "model" that outputs its input unchanged: the bar a seq2seq model must
    clear (it is high where source and target share words, as in summarization and in
    translating messages full of command names and placeholders)."""
    return seq2seq_scores(sources, references)


def majority_baseline(train_labels: Sequence[int], test_labels: Sequence[int]) -> float:
    """Test accuracy of always predicting the most frequent training class."""
    values, counts = np.unique(np.asarray(train_labels), return_counts=True)
    return accuracy([int(values[np.argmax(counts)])] * len(test_labels), test_labels)
