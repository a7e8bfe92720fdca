"""Text sources and tokenizers: every source kind, every tokenizer kind trained and reloaded,
the text preprocess end to end, and bad input refused in one line with nothing written."""

from __future__ import annotations

import gzip
import json
import logging

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("tokenizers")

from kubetrain.core.errors import ConfigError, DataError
from kubetrain.data.config import SPECIAL_TOKENS, DataConfig, TokenizerConfig
from kubetrain.data.shards import read_manifest, read_shard
from kubetrain.data.text import TextMeta, build_text_dataset, iter_examples
from kubetrain.data.tokenize import (
    Encoder,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    train_tokenizer,
)
from kubetrain.pipeline.config import load_config

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
    "jovial",
    "boxers",
    "and",
    "their",
    "zebras",
    "graze",
    "near",
    "old",
    "mills",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 12))) for _ in range(n)]


def table(n: int = 60, seed: int = 0) -> pd.DataFrame:
    texts = sentences(n, seed)
    return pd.DataFrame(
        {
            "text": texts,
            "label": ["long" if len(t.split()) > 7 else "short" for t in texts],
            "target": [" ".join(t.split()[:3]) for t in texts],
        }
    )


def write_source(df: pd.DataFrame, path) -> str:
    name = str(path)
    if name.endswith(".csv.gz"):
        with gzip.open(name, "wt", encoding="utf-8") as f:
            df.to_csv(f, index=False)
    elif name.endswith(".csv"):
        df.to_csv(name, index=False)
    elif name.endswith(".tsv"):
        df.to_csv(name, index=False, sep="\t")
    elif name.endswith(".jsonl"):
        df.to_json(name, orient="records", lines=True, force_ascii=False)
    else:
        df.to_parquet(name)
    return name


def cfg(source: str, task: str = "text_classification", **kw) -> DataConfig:
    tok = kw.pop("tokenizer", {"vocab_size": 60, "min_frequency": 1})
    return DataConfig(source=source, task=task, tokenizer=tok, **kw)


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "parquet", "csv.gz"])
def test_every_source_kind_reads_the_same_examples(tmp_path, suffix):
    df = table()
    source = write_source(df, tmp_path / f"data.{suffix}")
    got = list(iter_examples(cfg(source)))
    assert [e.text for e in got] == list(df.text)
    assert [e.other for e in got] == list(df.label)
    assert {e.split for e in got} == {"train", "val", "test"}


def test_fsspec_uri_and_glob_sources(tmp_path):
    import fsspec

    df = table()
    fs = fsspec.filesystem("memory")
    for i, part in enumerate((df.iloc[:30], df.iloc[30:])):
        with fs.open(f"/text-src/part-{i}.jsonl", "w") as f:
            part.to_json(f, orient="records", lines=True)
    got = list(iter_examples(cfg("memory:///text-src/part-*.jsonl", task="seq2seq")))
    assert [(e.text, e.other) for e in got] == list(zip(df.text, df.target, strict=True))


def test_local_glob_reads_files_in_name_order(tmp_path):
    df = table()
    write_source(df.iloc[30:], tmp_path / "b.csv")
    write_source(df.iloc[:30], tmp_path / "a.parquet")  # formats may mix
    got = list(iter_examples(cfg(str(tmp_path / "*.*"))))
    assert [e.text for e in got] == list(df.text)
    assert got[30].where.endswith("b.csv:2")


def test_split_is_seeded_and_stable(tmp_path):
    source = write_source(table(200), tmp_path / "d.csv")
    a = [e.split for e in iter_examples(cfg(source))]
    assert a == [e.split for e in iter_examples(cfg(source))]
    assert a != [e.split for e in iter_examples(cfg(source, seed=1))]
    assert 0.4 < a.count("train") / len(a) < 0.9


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_each_tokenizer_kind_trains_and_reloads_identically(tmp_path, kind):
    texts = sentences(300)
    tok = train_tokenizer(iter(texts), TokenizerConfig(kind=kind, vocab_size=80, min_frequency=1))
    assert special_ids(tok, "t") == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "cls": 4}
    assert 40 <= tok.get_vocab_size() <= 80
    save_tokenizer(tok, tmp_path)
    for path in (tmp_path, tmp_path / "tokenizer.json"):  # a directory or the file itself
        again = load_tokenizer(path)
        assert again.get_vocab() == tok.get_vocab()
        for t in [*texts[:20], "unseen Words 42 ü"]:
            assert again.encode(t).ids == tok.encode(t).ids
    enc = Encoder(tok, "seq2seq", 64)
    ids, _ = enc.target([texts[0]])
    assert enc.decode(ids[0]).split() == texts[0].split()  # decoding restores the words


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_the_same_text_trains_the_same_tokenizer(kind):
    """Same text, same tokenizer, ids included (WordPiece's trainer numbered its alphabet in
    hash-map order: every run had other ids, so another dataset version)."""
    texts = sentences(300)
    tcfg = TokenizerConfig(kind=kind, vocab_size=80, min_frequency=1)
    first = train_tokenizer(iter(texts), tcfg)
    assert all(train_tokenizer(iter(texts), tcfg).to_str() == first.to_str() for _ in range(3))
    if kind != "bpe":  # renumbered, not re-split: the pieces are the trainer's own
        import tokenizers as tk

        specials = list(SPECIAL_TOKENS.values())
        if kind == "wordpiece":
            raw = tk.Tokenizer(tk.models.WordPiece(unk_token=SPECIAL_TOKENS["unk"]))
            trainer = tk.trainers.WordPieceTrainer(
                vocab_size=80, min_frequency=1, special_tokens=specials
            )
        else:
            raw = tk.Tokenizer(tk.models.Unigram())
            trainer = tk.trainers.UnigramTrainer(
                vocab_size=80, special_tokens=specials, unk_token=SPECIAL_TOKENS["unk"]
            )
        raw.normalizer, raw.pre_tokenizer = first.normalizer, first.pre_tokenizer
        raw.train_from_iterator(iter(texts), trainer)
        for t in [*texts[:20], "unseen Words 42"]:
            assert first.encode(t).tokens == raw.encode(t).tokens


def test_encoder_adds_special_tokens_and_truncates():
    tok = train_tokenizer(iter(sentences(200)), TokenizerConfig(vocab_size=60, min_frequency=1))
    enc = Encoder(tok, "text_classification", 6)
    (short, long), cut = enc.classification(["fox", " ".join(WORDS)])
    assert short[0] == 4 and len(short) >= 2
    assert len(long) == 6 and cut == 1
    (src,), _ = enc.source(["fox"])
    (tgt,), _ = enc.target(["fox"])
    assert src[-1] == 3 and tgt[0] == 2 and tgt[-1] == 3


@pytest.mark.parametrize("task", ["text_classification", "seq2seq"])
def test_build_text_dataset_writes_tokenizer_shards_and_meta(tmp_path, task, caplog):
    df = table(80)
    df.loc[3, "text"] = "   "  # skipped and counted
    df.loc[5, "text"] = " ".join(WORDS * 3)  # truncated and counted
    source = write_source(df, tmp_path / "d.jsonl")
    out = tmp_path / "ds"
    with caplog.at_level(logging.WARNING):
        meta = build_text_dataset(cfg(source, task, max_length=16, shard_samples=16), out)
    assert meta.skipped_empty == 1 and meta.truncated >= 1
    assert "skipped 1 of " in caplog.text and "truncated" in caplog.text
    assert TextMeta.load(out) == meta
    manifest = read_manifest(str(out))
    assert sum(manifest.num_samples(s) for s in ("train", "val", "test")) == 79
    assert sum(meta.samples.values()) == 79
    assert len(manifest.splits["train"]) > 1  # several shards, one per tokenizer part
    assert [s.path for s in manifest.splits["train"][:2]] == [
        "train-000000.parquet",
        "train-000001.parquet",
    ]
    cols = read_shard(str(out), manifest.splits["train"][0])
    tok = load_tokenizer(out)
    if task == "text_classification":
        assert meta.classes == ["long", "short"]
        assert manifest.class_counts["train"] and set(cols) == {"row", "input_ids", "label"}
        assert all(
            ids[0] == meta.special_ids["cls"] and len(ids) <= 16 for ids in cols["input_ids"]
        )
        assert cols["input_ids"][0].dtype == np.uint16  # the narrowest integer type
    else:
        assert meta.classes is None and set(cols) == {"row", "src_ids", "tgt_ids"}
        row = int(cols["row"][0])
        assert tok.decode(list(cols["tgt_ids"][0]), skip_special_tokens=True).split() == (
            df.target[row].split()
        )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]  # no temporary left


def test_a_class_sorted_source_gives_mixed_shards(tmp_path):
    """The stream shuffles locally (a shard and a buffer): shards in source order would feed
    a sorted source's classes one at a time."""
    df = table(400).sort_values("label", kind="stable")
    source = write_source(df, tmp_path / "sorted.csv")
    build_text_dataset(cfg(source, shard_samples=16), tmp_path / "ds")
    manifest = read_manifest(str(tmp_path / "ds"))
    full = [s for s in manifest.splits["train"] if s.num_samples == 16]
    assert len(full) >= 4
    for shard in full:
        counts = np.bincount(read_shard(str(tmp_path / "ds"), shard)["label"], minlength=2)
        assert counts.min() >= 2, counts  # both classes in every full shard


@pytest.mark.integration
@pytest.mark.parametrize("task", ["text_classification", "seq2seq"])
def test_parallel_tokenization_writes_exactly_what_one_process_writes(tmp_path, task):
    source = write_source(table(300), tmp_path / "d.parquet")
    c = cfg(source, task, shard_samples=16)
    one = build_text_dataset(c, tmp_path / "one", num_processes=1)
    two = build_text_dataset(c, tmp_path / "two", num_processes=2)
    assert two.tokenize_processes == 2
    assert (
        read_manifest(str(tmp_path / "one")).version == read_manifest(str(tmp_path / "two")).version
    )
    assert (one.tokens, one.samples) == (two.tokens, two.samples)


def test_loaded_tokenizer_is_used_as_is(tmp_path):
    tok = train_tokenizer(iter(sentences(200)), TokenizerConfig(vocab_size=70, min_frequency=1))
    save_tokenizer(tok, tmp_path / "tok")
    source = write_source(table(), tmp_path / "d.csv")
    meta = build_text_dataset(
        cfg(source, tokenizer={"path": str(tmp_path / "tok")}), tmp_path / "ds"
    )
    assert load_tokenizer(tmp_path / "ds").get_vocab() == tok.get_vocab()
    assert meta.vocab_size == tok.get_vocab_size()


# -- bad input: one line each, nothing written ---------------------------------------------------
def _bad_csv(path):
    path.write_bytes(b"text,label\nfine words,a\nbad \xff\xfe bytes,b\n")


def _bad_jsonl(path):
    path.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')


def _bad_parquet(path):
    pd.DataFrame({"text": [b"ok", b"ok", b"\xff"], "label": ["a", "b", "a"]}).to_parquet(path)


def _no_column(path):
    pd.DataFrame({"sentence": ["x"], "label": ["a"]}).to_csv(path, index=False)


def _no_target(path):
    pd.DataFrame({"text": ["x"], "summary": ["y"]}).to_json(path, orient="records", lines=True)


def _empty_label(path):
    path.write_text("text,label\nsome words,\n")


@pytest.mark.parametrize(
    ("name", "make", "task", "expected"),
    [
        ("d.csv", _bad_csv, "text_classification", r"d\.csv:3: bytes that are not UTF-8"),
        ("d.jsonl", _bad_jsonl, "text_classification", r"d\.jsonl:2: bytes that are not UTF-8"),
        ("d.parquet", _bad_parquet, "text_classification", r"d\.parquet: row 3: bytes that are"),
        ("d.csv", _no_column, "text_classification", r"d\.csv: no column 'text' \(columns: "),
        ("d.jsonl", _no_target, "seq2seq", r"d\.jsonl:1: no column 'target' \(columns: text, s"),
        ("d.csv", _empty_label, "text_classification", r"d\.csv:2: empty label"),
        ("d.txt", lambda p: p.write_text("x"), "seq2seq", r"unknown text source format"),
        ("missing.csv", lambda p: None, "seq2seq", r"missing\.csv: no such file"),
    ],
    ids=[
        "csv-not-utf8", "jsonl-not-utf8", "parquet-not-utf8", "missing-text-column",
        "missing-target-column", "empty-label", "unknown-format", "no-such-file",
    ],
)  # fmt: skip
def test_bad_source_is_one_line_and_nothing_is_written(tmp_path, name, make, task, expected):
    make(tmp_path / name)
    with pytest.raises(DataError, match=expected) as info:
        build_text_dataset(cfg(str(tmp_path / name), task), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({name} - {"missing.csv"})


def test_an_output_that_is_not_a_text_dataset_is_not_replaced(tmp_path):
    source = write_source(table(), tmp_path / "d.csv")
    with pytest.raises(DataError, match="exists and is not a text dataset; refusing"):
        build_text_dataset(cfg(source), tmp_path)
    assert (tmp_path / "d.csv").is_file()
    build_text_dataset(cfg(source), tmp_path / "ds")
    build_text_dataset(cfg(source, seed=1), tmp_path / "ds")  # an earlier one is replaced
    assert (tmp_path / "ds" / "text.json").is_file()


def test_only_empty_text_is_refused(tmp_path):
    source = tmp_path / "d.csv"
    source.write_text("text,label\n  ,a\n\t,b\n")
    with pytest.raises(DataError, match="no usable training text"):
        build_text_dataset(cfg(str(source)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_path_that_does_not_exist(tmp_path):
    source = write_source(table(), tmp_path / "d.csv")
    c = cfg(source, tokenizer={"path": str(tmp_path / "nope")})
    with pytest.raises(DataError, match=r"data\.tokenizer\.path: .*nope: no such file or dir"):
        build_text_dataset(c, tmp_path / "out")
    with pytest.raises(DataError, match="hub names are not downloaded"):
        load_tokenizer("bert-base-uncased")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not a tokenizers tokenizer\.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_vocabulary_too_small_for_the_special_tokens(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.tokenizer: vocab_size 4 leaves no room"):
        load_config(overrides=["data.tokenizer.vocab_size=4"])
    # A loaded tokenizer that is too small, or lacks a special token.
    from tokenizers import Tokenizer, models

    tiny = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "a": 2}, unk_token="<unk>"))
    with pytest.raises(DataError, match="3 tokens is too small for the 5 special tokens"):
        special_ids(tiny, "tiny.json")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="the"))
    tok.save(str(tmp_path / "tokenizer.json"))
    source = write_source(table(), tmp_path / "d.csv")
    with pytest.raises(DataError, match=r"tokenizer has no special token '<pad>' \(pad\)"):
        build_text_dataset(cfg(source, tokenizer={"path": str(tmp_path)}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.task=translation", "data.task: Input should be"),
        ("data.max_length=2", "data.max_length: Input should be greater than or equal to 4"),
        ("train.batch_tokens=1", "batch_tokens 1 is less than one token per micro-batch"),
        ("evaluate.beam_size=0", "evaluate.beam_size"),
    ],
    ids=["task", "max-length", "batch-tokens", "beam-size"],
)
def test_text_config_fields_are_validated(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides=[override])


def test_text_config_fields_accept_good_values():
    c = load_config(
        overrides=["data.task=seq2seq", "train.batch_tokens=4096", "evaluate.beam_size=4"]
    )
    assert c.data.task == "seq2seq" and c.evaluate.beam_size == 4
    assert c.train.tokens_per_micro_batch() == 4096 // c.train.world_size


def test_meta_json_round_trips(tmp_path):
    (tmp_path / "text.json").write_text(json.dumps({"task": "seq2seq"}))
    with pytest.raises(DataError, match="text.json: unreadable"):
        TextMeta.load(tmp_path)
    with pytest.raises(DataError, match="missing"):
        TextMeta.load(tmp_path / "none")


@pytest.mark.parametrize("task", ["text_classification", "seq2seq"])
def test_token_shards_stream_bucketed_into_a_transformer(tmp_path, task):
    """The pieces fit: preprocess output -> StreamingDataset + bucketing -> model loss."""
    import torch

    from kubetrain.data.batching import BucketingCollate, iter_batches
    from kubetrain.data.streaming import StreamingDataset
    from kubetrain.models.losses import label_smoothed_loss, seq2seq_loss
    from kubetrain.models.transformer import (
        Seq2SeqTransformer,
        TransformerClassifier,
        TransformerConfig,
    )

    out = tmp_path / "ds"
    meta = build_text_dataset(cfg(write_source(table(120), tmp_path / "d.csv"), task), out)
    sp = meta.special_ids
    ds = StreamingDataset(
        str(out), "train", 32, collate=BucketingCollate(sp["pad"], batch_tokens=200)
    )
    size = TransformerConfig(d_model=16, heads=2, layers=1, ff=32, max_len=meta.max_length)
    rows = []
    for batch in iter_batches(ds):
        rows += batch["row"].tolist()
        if task == "text_classification":
            model = TransformerClassifier(meta.vocab_size, len(meta.classes), size, sp["pad"])
            loss = label_smoothed_loss(model(batch["input_ids"]), batch["label"])
        else:
            model = Seq2SeqTransformer(meta.vocab_size, size, sp["pad"], sp["bos"], sp["eos"])
            loss = seq2seq_loss(model, batch["src_ids"], batch["tgt_ids"])
        assert torch.isfinite(loss)
    assert len(rows) == len(set(rows)) == meta.samples["train"]
