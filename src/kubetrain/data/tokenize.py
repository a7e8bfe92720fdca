"""Tokenizers for text tasks, and parallel tokenization into token shards.

A tokenizer is Hugging Face ``tokenizers``' (its ``tokenizer.json`` is the one file every step
loads, so preprocess, training, evaluation and a served model split text identically). It is
either trained on the training split (BPE, WordPiece or Unigram, with the special tokens of
``kubetrain.data.config.SPECIAL_TOKENS`` at ids 0..4) or loaded from a local ``tokenizer.json``
or a directory holding one; a loaded one must know those special tokens.

Sequences are stored with their special tokens, so every step reads the same ids:

- text classification: ``<cls> text`` (``input_ids``, plus ``label``);
- seq2seq: source ``text </s>`` (``src_ids``), target ``<s> text </s>`` (``tgt_ids``).

Each record also keeps ``row``, its row in the source, to put predictions beside their text.
Shards are not in source order: each split's examples are scattered over several parts at once
(see ``cut_parts``), so a sorted source does not give single-class shards.

Tokenization runs in ``num_processes`` worker processes started from a ``forkserver`` (a fresh
process that has only imported the modules they need: a worker never inherits a parent's thread
pools, which ``tokenizers`` and torch both keep, and pays no imports of its own). The examples
are cut into parts of ``shard_samples``; each worker tokenizes a part and writes it as one shard
numbered by the part (``ShardWriter(first_index=part)``), so shards need not pass back through
the parent; the parent writes the manifest. Parts and shard names depend only on the input, so
N processes write exactly the shards one process writes (tested).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kubetrain.core.errors import DataError
from kubetrain.data.config import SPECIAL_TOKENS, TokenizerConfig
from kubetrain.data.shards import ShardInfo, ShardWriter, write_manifest

TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val", "test")
MIX_PARTS = 16  # parts of a split filled at once (see ``cut_parts``)


def _tokenizers():
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - depends on the environment
        raise DataError(
            "text tasks need Hugging Face tokenizers: pip install 'kubetrain[text]'"
        ) from None
    return tokenizers


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig):
    """Train a subword tokenizer on ``texts``.

    Args:
        texts: the training split's text (an iterator is fine: it is read once).
        cfg: kind (``bpe`` | ``wordpiece`` | ``unigram``), vocabulary size, lower-casing.

    Returns:
        A ``tokenizers.Tokenizer`` whose special tokens have ids 0..4 in the order of
        ``SPECIAL_TOKENS``. BPE and Unigram split on whitespace the SentencePiece way
        (``Metaspace``: decoding restores the spaces); WordPiece splits like BERT.
    """
    tk = _tokenizers()
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    specials = list(SPECIAL_TOKENS.values())
    unk = SPECIAL_TOKENS["unk"]
    trainer: trainers.Trainer
    if cfg.kind == "bpe":
        tok = tk.Tokenizer(models.BPE(unk_token=unk))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=specials
        )
    elif cfg.kind == "wordpiece":
        tok = tk.Tokenizer(models.WordPiece(unk_token=unk))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=specials
        )
    else:
        tok = tk.Tokenizer(models.Unigram())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=cfg.vocab_size, special_tokens=specials, unk_token=unk
        )
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if cfg.lowercase else [])
    tok.normalizer = normalizers.Sequence(steps)
    tok.train_from_iterator(texts, trainer=trainer)
    # The same text must give the same tokenizer, ids included (else every preprocess is another
    # dataset version and no cache hit): the WordPiece trainer numbers its alphabet in hash-map
    # order; the Unigram trainer's scores differ in the last bits with the order its threads sum
    # in, and it orders pieces of equal score as they finish. Both split by the vocabulary (and
    # Unigram's scores), not by id, so numbering the same pieces in a fixed order (the special
    # tokens first, as trained) with scores rounded to 1e-9 changes no split.
    if cfg.kind == "wordpiece":
        vocab = tok.get_vocab()
        ordered = specials + sorted(t for t in vocab if t not in specials)
        tok.model = models.WordPiece({t: i for i, t in enumerate(ordered)}, unk_token=unk)
    elif cfg.kind == "unigram":
        pieces = [(p, round(score, 9)) for p, score in json.loads(tok.to_str())["model"]["vocab"]]
        scores = dict(pieces)
        rest = sorted((p for p in pieces if p[0] not in specials), key=lambda p: (-p[1], p[0]))
        ordered = [(t, scores[t]) for t in specials] + rest
        tok.model = models.Unigram(ordered, unk_id=specials.index(unk), byte_fallback=False)
    return tok


def load_tokenizer(path: str | Path):
    """Load a local ``tokenizer.json``, or the one inside directory ``path``.

    Raises:
        DataError: nothing at ``path`` (a hub name is not looked up: no network at run time),
            or the file is not a ``tokenizers`` tokenizer.
    """
    tk = _tokenizers()
    p = Path(path)
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        what = f"{file}: no such file" if p.is_dir() else f"{path}: no such file or directory"
        raise DataError(
            f"data.tokenizer.path: {what} (a local tokenizer.json or a directory holding one; "
            "hub names are not downloaded)"
        )
    try:
        tok = tk.Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{file}: not a tokenizers tokenizer.json ({first})") from None
    # Sequences get their special tokens and lengths from us, the same for every tokenizer.
    tok.no_truncation()
    tok.no_padding()
    return tok


def special_ids(tok, where: str) -> dict[str, int]:
    """The ids of the special tokens (``pad``, ``unk``, ``bos``, ``eos``, ``cls``) in ``tok``.

    Raises:
        DataError: naming ``where``: the vocabulary is too small to hold them, or one is missing.
    """
    size = tok.get_vocab_size()
    if size <= len(SPECIAL_TOKENS):
        raise DataError(
            f"{where}: a vocabulary of {size} tokens is too small for the "
            f"{len(SPECIAL_TOKENS)} special tokens {' '.join(SPECIAL_TOKENS.values())}"
        )
    out = {}
    for name, token in SPECIAL_TOKENS.items():
        idx = tok.token_to_id(token)
        if idx is None:
            raise DataError(
                f"{where}: the tokenizer has no special token {token!r} ({name}); add "
                f"{' '.join(SPECIAL_TOKENS.values())} to it"
            )
        out[name] = idx
    return out


def save_tokenizer(tok, directory: str | Path) -> Path:
    """Write ``tok`` as ``<directory>/tokenizer.json``; returns that path."""
    path = Path(directory, TOKENIZER_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


# -- encoding ---------------------------------------------------------------------------------
@dataclass
class Part:
    """A run of examples of one split, tokenized by one worker into its own shard(s)."""

    split: str
    index: int
    rows: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    others: list[Any] = field(default_factory=list)  # class indices or target texts


@dataclass
class PartResult:
    split: str
    index: int
    shards: list[ShardInfo]
    class_counts: dict[str, int]
    columns: dict[str, str]
    tokens: int
    truncated: int
    samples: int
    last_row: int = -1  # the last source row the part holds


@dataclass
class TokenizeSummary:
    """What tokenization wrote: samples and tokens per split, sequences truncated, processes."""

    samples: dict[str, int]
    tokens: dict[str, int]
    truncated: int
    processes: int


def fit(ids: list[int], budget: int) -> tuple[list[int], bool]:
    """``ids`` cut to ``budget`` tokens, and whether they had to be."""
    return (ids[:budget], True) if len(ids) > budget else (ids, False)


class Encoder:
    """Turns texts into the stored id sequences of a task (special tokens and truncation).

    Args:
        tok: a ``tokenizers.Tokenizer``.
        task: ``text_classification`` or ``seq2seq``.
        max_length: most ids per stored sequence, special tokens included (at least 4).
    """

    def __init__(self, tok, task: str, max_length: int) -> None:
        self.tok, self.task, self.max_length = tok, task, max_length
        self.special = special_ids(tok, "tokenizer")

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def classification(self, texts: list[str]) -> tuple[list[np.ndarray], int]:
        """``<cls> text`` per text, and how many were truncated."""
        out, cut = [], 0
        for ids in self._ids(texts):
            ids, was = fit(ids, self.max_length - 1)
            cut += was
            out.append(np.asarray([self.special["cls"], *ids], dtype=np.int64))
        return out, cut

    def source(self, texts: list[str]) -> tuple[list[np.ndarray], int]:
        """``text </s>`` per text (an encoder input), and how many were truncated."""
        out, cut = [], 0
        for ids in self._ids(texts):
            ids, was = fit(ids, self.max_length - 1)
            cut += was
            out.append(np.asarray([*ids, self.special["eos"]], dtype=np.int64))
        return out, cut

    def target(self, texts: list[str]) -> tuple[list[np.ndarray], int]:
        """``<s> text </s>`` per text (a decoder sequence), and how many were truncated."""
        out, cut = [], 0
        for ids in self._ids(texts):
            ids, was = fit(ids, self.max_length - 2)
            cut += was
            out.append(np.asarray([self.special["bos"], *ids, self.special["eos"]], np.int64))
        return out, cut

    def decode(self, ids) -> str:
        """Text of an id sequence, special tokens dropped."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


_WORKER: dict[str, Any] = {}


def _init_worker(tok_json: str, task: str, max_length: int) -> None:
    # One thread per worker: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = _tokenizers().Tokenizer.from_str(tok_json)
    _WORKER["encoder"] = Encoder(tok, task, max_length)


def _encode_part(part: Part, root: str, opts: dict[str, Any]) -> PartResult:
    enc: Encoder = _WORKER["encoder"]
    if enc.task == "text_classification":
        ids, cut = enc.classification(part.texts)
        records = [
            {"row": r, "input_ids": x, "label": int(y)}
            for r, x, y in zip(part.rows, ids, part.others, strict=True)
        ]
        tokens = sum(len(x) for x in ids)
    else:
        src, cut_s = enc.source(part.texts)
        tgt, cut_t = enc.target([str(t) for t in part.others])
        records = [
            {"row": r, "src_ids": s, "tgt_ids": t}
            for r, s, t in zip(part.rows, src, tgt, strict=True)
        ]
        cut, tokens = cut_s + cut_t, sum(len(x) for x in src) + sum(len(x) for x in tgt)
    label = "label" if enc.task == "text_classification" else None
    # One part, one shard, numbered by the part: parallel writers never collide.
    with ShardWriter(
        root, part.split, max_samples=len(records) + 1, max_bytes=1 << 62, storage_options=opts,
        label_column=label, first_index=part.index,
    ) as w:  # fmt: skip
        w.write_all(records)
    return PartResult(
        part.split, part.index, w.shards, dict(w.class_counts), w.columns, tokens, cut,
        len(records), part.rows[-1] if part.rows else -1,
    )  # fmt: skip


def _slot(row: int, slots: int, seed: int) -> int:
    # A splitmix64-style hash of the row: the same slot in every run and every process.
    z = (row * 0x9E3779B97F4A7C15 + (seed + 7) * 0xD1B54A32D192ED03) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 31)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 29)) % slots


def cut_parts(
    examples: Iterable[tuple[str, int, str, Any]], size: int, mix: int = MIX_PARTS, seed: int = 0
) -> Iterator[Part]:
    """Cut examples into parts of ``size``, scattering each split over ``mix`` open parts by a
    seeded hash of the row. A part's rows and number depend only on the examples up to its last
    row: a reader that stops after that row gets the part whole (``kubetrain.data.text``'s
    convert tasks read no further than their parts need).

    Why: a source is often sorted (WordNet by category, catalogs by file), and the stream's
    shuffle is local (a shard and a buffer), so shards written in source order would feed
    training one class at a time. Scattered, each shard is a random sample of ``mix * size``
    consecutive examples (of the whole split when it is smaller than that).
    """
    open_parts: dict[tuple[str, int], Part] = {}
    counts: Counter[str] = Counter()
    for split, row, text, other in examples:
        key = (split, _slot(row, mix, seed))
        part = open_parts.get(key)
        if part is None:
            part = open_parts[key] = Part(split, counts[split])
            counts[split] += 1
        part.rows.append(row)
        part.texts.append(text)
        part.others.append(other)
        if len(part.rows) >= size:
            yield open_parts.pop(key)
    yield from sorted(open_parts.values(), key=lambda p: (p.split, p.index))


@dataclass
class _SplitShards:
    """A finished split, shaped like a ``ShardWriter`` for ``write_manifest``."""

    split: str
    shards: list[ShardInfo] = field(default_factory=list)
    class_counts: Counter = field(default_factory=Counter)
    columns: dict[str, str] = field(default_factory=dict)


def tokenize_to_shards(
    examples: Iterable[tuple[str, int, str, Any]],
    tok,
    root: str,
    *,
    task: str,
    max_length: int,
    num_processes: int = 1,
    shard_samples: int = 4096,
    storage_options: Mapping[str, Any] | None = None,
    mix_parts: int = MIX_PARTS,
    seed: int = 0,
) -> TokenizeSummary:
    """Tokenize ``(split, row, text, label or target)`` examples into token shards at ``root``.

    Args:
        examples: in source order; read lazily (at most ``2 * num_processes`` parts in flight).
        tok: the tokenizer (sent to the workers as its JSON).
        root: the dataset directory (``shards.json`` and the shards go there).
        task: ``text_classification`` (label: a class index) or ``seq2seq`` (target text).
        max_length: most ids per stored sequence, special tokens included.
        num_processes: worker processes; 1 tokenizes in this process.
        shard_samples: examples per part (one shard each).
        storage_options: fsspec options of ``root`` (the manifest writer's).
        mix_parts: parts of a split filled at once, examples scattered over them by a hash
            of their row seeded by ``seed`` (so a sorted source still gives mixed shards).
        seed: the seed of that scattering.

    Returns:
        Samples and tokens per split, sequences truncated, processes used.

    Raises:
        DataError: the tokenizer lacks a special token; whatever reading ``examples`` raises.
    """
    parts = cut_parts(examples, shard_samples, mix=mix_parts, seed=seed)
    results = encode_parts(parts, tok, root, task, max_length, num_processes, storage_options)
    return write_splits(results, root, num_processes, storage_options)


def encode_parts(
    parts: Iterable[Part],
    tok,
    root: str,
    task: str,
    max_length: int,
    num_processes: int,
    storage_options: Mapping[str, Any] | None,
) -> list[PartResult]:
    """Encode and write every part (one shard each, numbered by the part), here (1 process)
    or in a pool of ``num_processes``; the results in the order the parts came."""
    args = (tok.to_str(), task, max_length)
    opts = dict(storage_options or {})
    results: list[PartResult] = []
    if num_processes <= 1:
        _WORKER["encoder"] = Encoder(tok, task, max_length)
        return [_encode_part(p, root, opts) for p in parts]
    ctx = multiprocessing.get_context("forkserver")
    # Workers fork from a server that imported these once (pyarrow imports pandas when it
    # builds list arrays): N workers do not each pay ~2 s of imports.
    ctx.set_forkserver_preload(["kubetrain.data.tokenize", "pyarrow.parquet", "pandas"])
    with ctx.Pool(num_processes, initializer=_init_worker, initargs=args) as pool:
        pending: deque = deque()
        for p in parts:
            pending.append(pool.apply_async(_encode_part, (p, root, opts)))
            if len(pending) >= 2 * num_processes:
                results.append(pending.popleft().get())
        results += [r.get() for r in pending]
    return results


def write_splits(
    results: list[PartResult],
    root: str,
    num_processes: int,
    storage_options: Mapping[str, Any] | None,
) -> TokenizeSummary:
    """Gather the parts' shards by split in part order, write the manifest, sum the counts
    (the parts may come from several processes or tasks, in any order)."""
    splits = {s: _SplitShards(s) for s in SPLITS}
    tokens: Counter[str] = Counter()
    samples: Counter[str] = Counter()
    for r in sorted(results, key=lambda r: (SPLITS.index(r.split), r.index)):
        sp = splits[r.split]
        sp.shards += r.shards
        sp.class_counts.update(r.class_counts)
        sp.columns = sp.columns or r.columns
        tokens[r.split] += r.tokens
        samples[r.split] += r.samples
    write_manifest(root, splits.values(), storage_options)  # type: ignore[arg-type]
    return TokenizeSummary(
        samples={s: samples[s] for s in SPLITS},
        tokens={s: tokens[s] for s in SPLITS},
        truncated=sum(r.truncated for r in results),
        processes=max(1, num_processes),
    )
