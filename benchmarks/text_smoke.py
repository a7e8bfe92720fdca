"""The text pieces learn on real data, before the pipeline takes text: WordNet glosses of the 10
largest noun categories -> tokenizer + token shards -> bucketed stream -> `transformer` -> test
accuracy and macro-F1 beside the majority class and TF-IDF + logistic regression on the same
token ids.

    .venv/bin/python benchmarks/text_smoke.py [--epochs 2] [--out DIR]

Needs Debian's ``wordnet-base``. Prints one line of figures; a few minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=None, help="where the dataset goes (default: a temp dir)")
    args = ap.parse_args()

    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from kubetrain.data.batching import BucketingCollate, iter_batches
    from kubetrain.data.corpora import wordnet_glosses, write_jsonl
    from kubetrain.data.streaming import StreamingDataset
    from kubetrain.data.text import build_text_dataset
    from kubetrain.models.losses import label_smoothed_loss
    from kubetrain.models.transformer import TransformerConfig, build_text_model
    from kubetrain.pipeline.config import load_config
    from kubetrain.tasks.text_metrics import accuracy, macro_f1, majority_baseline

    torch.set_num_threads(1)
    torch.manual_seed(0)
    work = Path(args.out or tempfile.mkdtemp(prefix="text-smoke-"))
    nouns = [r for r in wordnet_glosses() if r["label"].startswith("noun.")]
    top = {c for c, _ in Counter(r["label"] for r in nouns).most_common(10)}
    write_jsonl([r for r in nouns if r["label"] in top], work / "wn10.jsonl")
    cfg = load_config(
        overrides=[
            f"data.source={work / 'wn10.jsonl'}", "data.task=text_classification",
            "data.max_length=64", "data.tokenizer.vocab_size=4000", "data.tokenizer.lowercase=true",
        ]
    )  # fmt: skip
    ds_dir = str(work / "ds")
    meta = build_text_dataset(cfg.data, ds_dir)
    pad = meta.special_ids["pad"]
    sizes = TransformerConfig(d_model=64, heads=4, layers=2, ff=128, dropout=0.1, max_len=64)
    model = build_text_model("transformer", meta, sizes)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def split(name: str, collate, **kw):
        return iter_batches(StreamingDataset(ds_dir, name, 4096, collate=collate, **kw))

    start, steps = time.perf_counter(), 0
    for epoch in range(args.epochs):
        model.train()
        for b in split("train", BucketingCollate(pad, None, 2048, seed=epoch), seed=epoch):
            loss = label_smoothed_loss(model(b["input_ids"]), b["label"], 0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    train_s = time.perf_counter() - start

    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for b in split("test", BucketingCollate(pad, 256), shuffle=False):
            preds += model(b["input_ids"]).argmax(-1).tolist()
            labels += b["label"].tolist()

    def texts(name: str):
        rows = [b for b in split(name, BucketingCollate(pad, 4096, bucket=False), shuffle=False)]
        ids = [" ".join(map(str, r[r != pad].tolist())) for b in rows for r in b["input_ids"]]
        return ids, np.concatenate([b["label"].numpy() for b in rows])

    (xtr, ytr), (xte, yte) = texts("train"), texts("test")
    vec = TfidfVectorizer(token_pattern=r"\S+", sublinear_tf=True)
    clf = LogisticRegression(max_iter=300, C=5).fit(vec.fit_transform(xtr), ytr)
    tfidf = float((clf.predict(vec.transform(xte)) == yte).mean())
    print(
        f"wordnet top-10 nouns: {meta.samples['train']} train / {len(labels)} test; "
        f"transformer {steps} steps in {train_s:.0f} s: accuracy {accuracy(preds, labels):.3f}, "
        f"macro-F1 {macro_f1(preds, labels):.3f}; majority {majority_baseline(ytr, yte):.3f}; "
        f"TF-IDF + LR on the token ids {tfidf:.3f}"
    )


if __name__ == "__main__":
    main()
