"""Batches of token sequences that do not pay for padding: length bucketing over a window.

A batch of sequences is padded to its longest one, so a batch that mixes a 5-token sentence
with a 120-token one is mostly padding. Length bucketing sorts a *window* of samples (many
batches' worth, already shuffled by the stream) by length and cuts the sorted run into batches,
so each batch holds sequences of similar length; then it shuffles the order of those batches so
training does not see short-to-long within a window.

It sits on :class:`kubetrain.data.streaming.StreamingDataset` without changing it: the stream's
``batch_size`` is the window, and :class:`BucketingCollate` is its ``collate``: each stream item
is then a *list* of padded batches. So the stream's guarantees carry over unchanged (every sample
once per epoch across ranks x workers, seeded order, exact resume at window boundaries), and a
loop resumes inside a window by skipping that window's first batches (:func:`iter_batches`).

Batches are cut either to ``batch_size`` samples or to a token budget (``train.batch_tokens``):
``samples x longest`` (summed over source and target for seq2seq) stays within the budget, and a
sequence longer than the budget is a batch by itself. :class:`PaddingMeter` measures the padding
share of what was produced.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Record = dict[str, Any]
SEQ_COLUMNS = ("input_ids", "src_ids", "tgt_ids")


def _lengths(record: Record) -> tuple[int, ...]:
    return tuple(len(record[c]) for c in SEQ_COLUMNS if c in record)


def pad(seqs: Sequence[np.ndarray], pad_id: int) -> torch.Tensor:
    """``[len(seqs), longest]`` int64 tensor of ``seqs``, right-padded with ``pad_id``."""
    longest = max(len(s) for s in seqs)
    out = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
    return out


def pad_collate(records: Sequence[Record], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch: each id column padded, ``label``/``row`` as tensors.

    Args:
        records: token records (``input_ids`` + ``label``, or ``src_ids`` + ``tgt_ids``; ``row``).
        pad_id: the tokenizer's ``<pad>`` id.

    Returns:
        ``{column: tensor}``: ``[B, T]`` for id columns, ``[B]`` for scalars.
    """
    batch: dict[str, torch.Tensor] = {}
    for name in records[0]:
        values = [r[name] for r in records]
        if name in SEQ_COLUMNS:
            batch[name] = pad(values, pad_id)
        else:
            batch[name] = torch.as_tensor(np.asarray(values))
    return batch


def padding_counts(batch: dict[str, torch.Tensor], pad_id: int) -> tuple[int, int]:
    """``(padding, total)`` token slots over the id columns of a padded batch."""
    padding = total = 0
    for name in SEQ_COLUMNS:
        if name in batch:
            ids = batch[name]
            total += ids.numel()
            # Padding is what follows a sequence's end; a pad id inside one cannot occur.
            padding += int((ids == pad_id).sum())
    return padding, total


def cut(
    lengths: Sequence[tuple[int, ...]], batch_size: int | None, batch_tokens: int | None
) -> list[list[int]]:
    """Index groups of consecutive (sorted) samples: at most ``batch_size`` samples each, or
    each within ``batch_tokens`` padded tokens (a longer sample alone)."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest: tuple[int, ...] | None = None
    for i, lens in enumerate(lengths):
        grown = lens if longest is None else tuple(map(max, longest, lens))
        if batch_tokens is None:
            fits = len(current) < (batch_size or 1)
        else:
            fits = (len(current) + 1) * sum(grown) <= batch_tokens
        if current and not fits:
            groups.append(current)
            current, grown = [], lens
        current.append(i)
        longest = grown
    if current:
        groups.append(current)
    return groups


@dataclass
class BucketingCollate:
    """A ``collate`` for :class:`StreamingDataset` that turns a window of records into a list of
    length-bucketed, padded batches (pass the window size as the stream's ``batch_size``).

    Args:
        pad_id: the tokenizer's ``<pad>`` id.
        batch_size: samples per batch (used when ``batch_tokens`` is None).
        batch_tokens: padded tokens per batch (one process's share of ``train.batch_tokens``).
        seed: with the window's content, fixes the order of its batches.
        bucket: False pads windows cut in stream order (to measure what bucketing saves).
    """

    pad_id: int
    batch_size: int | None = 32
    batch_tokens: int | None = None
    seed: int = 0
    bucket: bool = True

    def __post_init__(self) -> None:
        if self.batch_tokens is None and not self.batch_size:
            raise ValueError("give batch_size or batch_tokens")

    def _groups(self, records: list[Record]) -> tuple[list[int], list[list[int]]]:
        order = list(range(len(records)))
        if self.bucket:
            # Stable sort: equal lengths keep the stream's (shuffled) order.
            order.sort(key=lambda i: _lengths(records[i]))
        lengths = [_lengths(records[i]) for i in order]
        return order, cut(lengths, self.batch_size, self.batch_tokens)

    def count(self, records: list[Record]) -> int:
        """How many batches ``self(records)`` gives, without padding anything (a ``collate``
        for counting an epoch's batches under a token budget)."""
        return len(self._groups(records)[1])

    def __call__(self, records: list[Record]) -> list[dict[str, torch.Tensor]]:
        order, groups = self._groups(records)
        # The batches' order is seeded by the window's content (its rows), not by a counter, so
        # a resumed stream, which skips whole windows without collating them, gets the same order.
        rows = np.asarray([int(r.get("row", i)) for i, r in enumerate(records)], dtype=np.int64)
        rng = np.random.default_rng([self.seed, zlib.crc32(rows.tobytes())])
        if self.bucket:
            groups = [groups[int(j)] for j in rng.permutation(len(groups))]
        return [pad_collate([records[order[i]] for i in g], self.pad_id) for g in groups]


def iter_batches(windows: Iterable[list[Any]], skip: int = 0) -> Iterator[Any]:
    """The batches of a stream of windows, flattened; ``skip`` drops the first batches of the
    first window (resuming inside it)."""
    for window in windows:
        yield from window[skip:]
        skip = 0


class PaddingMeter:
    """Counts padding in produced batches: ``share`` = padded slots / all slots."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id, self.padding, self.total, self.batches = pad_id, 0, 0, 0

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        p, t = padding_counts(batch, self.pad_id)
        self.padding, self.total, self.batches = self.padding + p, self.total + t, self.batches + 1

    @property
    def share(self) -> float:
        """Share of token slots that were padding (0 when nothing was counted)."""
        return self.padding / self.total if self.total else 0.0
