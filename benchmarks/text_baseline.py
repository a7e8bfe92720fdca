"""The bar of the text-classification recipe: TF-IDF + logistic regression (scikit-learn) on the
same train/test split that ``kubetrain run --config text-classification`` makes, next to the
majority class.

The split is the preprocess step's own (``kubetrain.data.text.iter_examples``: a seeded hash of
each row), so the numbers compare with the pipeline's test accuracy directly. Words and word
pairs, sublinear term frequency, C=10.

    .venv/bin/python benchmarks/text_baseline.py [--config text-classification] [--set k=v ...]

Writes ``benchmarks/results/text_baseline.md`` and prints the same.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def measure(data_cfg) -> dict:
    """Majority and TF-IDF + LR accuracy / macro-F1 on the test split of ``data_cfg``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    from kubetrain.data.text import iter_examples

    texts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    labels: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for ex in iter_examples(data_cfg):
        texts[ex.split].append(ex.text)
        labels[ex.split].append(ex.other)
    started = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True,
                          lowercase=True)  # fmt: skip
    x_train = vec.fit_transform(texts["train"])
    c = 10.0  # not tuned: one fit of 45 classes on ~100k glosses is minutes on 2 cores
    clf = LogisticRegression(C=c, max_iter=200)
    clf.fit(x_train, labels["train"])
    predicted = clf.predict(vec.transform(texts["test"]))
    majority = Counter(labels["train"]).most_common(1)[0][0]
    return {
        "samples": {k: len(v) for k, v in texts.items()},
        "classes": len(set(labels["train"])),
        "majority_accuracy": float(np.mean([y == majority for y in labels["test"]])),
        "tfidf_lr_accuracy": float(accuracy_score(labels["test"], predicted)),
        "tfidf_lr_macro_f1": float(f1_score(labels["test"], predicted, average="macro")),
        "C": c,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    from kubetrain.pipeline.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="text-classification")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    r = measure(cfg.data)
    text = (
        f"## Text classification baseline (`benchmarks/text_baseline.py --config {args.config}`)\n\n"
        f"Source `{cfg.data.source}`, {r['classes']} classes, samples {r['samples']} (the "
        "pipeline's split).\n\n"
        "| model | test accuracy | test macro-F1 |\n|---|---|---|\n"
        f"| majority class | {r['majority_accuracy']:.4f} | |\n"
        f"| TF-IDF (words + pairs) + logistic regression (C={r['C']:g}) | "
        f"{r['tfidf_lr_accuracy']:.4f} | {r['tfidf_lr_macro_f1']:.4f} |\n\n"
        f"Fitted in {r['seconds']:.1f} s. The recipe's Transformer must reach at least the "
        "TF-IDF line (its test accuracy is in the run's report).\n"
    )
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "text_baseline.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
