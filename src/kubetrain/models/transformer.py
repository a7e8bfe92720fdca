"""Transformers for text: an encoder classifier and a pre-norm encoder-decoder (their decoding:
``kubetrain.models.decoding``; their loss: ``kubetrain.models.losses``).

Attention is built from plain ``nn.Linear`` q/k/v/o projections and
``F.scaled_dot_product_attention`` (not ``nn.MultiheadAttention``, whose input projection is a
raw parameter): every projection is an ``nn.Linear``, so int8 quantization covers all of them and
the model exports. Padding is masked everywhere (keys in self- and cross-attention, the pooled
classifier), so a padded sequence gives the outputs of the same sequence alone (tested).

Decoding is incremental: :meth:`Seq2SeqTransformer.start_decoding` computes the cross-attention
keys/values of the source once, and each :meth:`Seq2SeqTransformer.decode_step` sends only the new
token through the decoder, appending its self-attention keys/values to the cache (O(T) decoder
work for T tokens instead of re-decoding every prefix, O(T^2)). It gives the logits of
:meth:`~Seq2SeqTransformer.decode` (to 1e-5, tested) and the same tokens; models without it (the
Hugging Face wrapper, users' own) are decoded by re-decoding.

The models know nothing of distribution or of the tokenizer beyond three ids (pad, bos, eos).
Sizes come from :class:`TransformerConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from kubetrain.core.records import TextSpec


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of a text Transformer.

    Attributes:
        d_model: width of every token representation.
        heads: attention heads (``d_model`` must divide by it).
        layers: encoder layers (and decoder layers of the seq2seq model, unless ``decoder_layers``).
        decoder_layers: decoder layers of the seq2seq model (default: ``layers``).
        ff: hidden width of the feed-forward blocks.
        dropout: dropout on attention weights, residual branches and embeddings.
        max_len: most positions (at least the data's ``max_length``).
    """

    d_model: int = 128
    heads: int = 4
    layers: int = 2
    decoder_layers: int | None = None
    ff: int = 512
    dropout: float = 0.1
    max_len: int = 256

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by heads {self.heads}")
        if min(self.d_model, self.heads, self.layers, self.ff, self.max_len) < 1:
            raise ValueError("Transformer sizes must be positive")


class Attention(nn.Module):
    """Multi-head attention from four ``nn.Linear`` layers and ``scaled_dot_product_attention``.

    ``forward`` attends a whole sequence at once; ``keys_values`` and ``attend`` are its two
    halves, for incremental decoding, where keys and values are computed once and cached.
    """

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def _split(self, y: torch.Tensor) -> torch.Tensor:
        """``[B,T,D]`` -> ``[B,heads,T,D/heads]``."""
        b, t, d = y.shape
        return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``kv`` [B,S,D], each ``[B,heads,S,D/heads]``."""
        return self._split(self.k(kv)), self._split(self.v(kv))

    def attend(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` [B,T,D] to the keys and values of :meth:`keys_values`.

        Args:
            x: the queries' inputs.
            k, v: ``[B,heads,S,D/heads]``.
            mask: boolean, broadcastable to ``[B,heads,T,S]``, True where a query may attend.

        Returns:
            ``[B,T,D]``.
        """
        b, t, d = x.shape
        out = F.scaled_dot_product_attention(
            self._split(self.q(x)), k, v, attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        return self.o(out.transpose(1, 2).reshape(b, t, d))

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        key_padding: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Attend from ``x`` [B,T,D] to ``memory`` [B,S,D] (default: ``x`` itself).

        ``key_padding`` [B,S] is True at padded keys; ``causal`` lets position t see keys <= t.
        """
        k, v = self.keys_values(x if memory is None else memory)
        t, s = x.shape[1], k.shape[2]
        mask = None  # boolean, True = may attend
        if key_padding is not None:
            mask = ~key_padding[:, None, None, :]
        if causal:
            allowed = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(s - t)
            mask = allowed if mask is None else mask & allowed
        return self.attend(x, k, v, mask)


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, ff: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(d_model, ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff, d_model)
        )


class EncoderLayer(nn.Module):
    """Pre-norm: ``x + attn(norm(x))``, then ``x + ff(norm(x))``."""

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.attn = Attention(c.d_model, c.heads, c.dropout)
        self.ff = FeedForward(c.d_model, c.ff, c.dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), key_padding=padding))
        return x + self.drop(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    """Pre-norm: causal self-attention, cross-attention to the encoder, feed-forward."""

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(c.d_model) for _ in range(3))
        self.self_attn = Attention(c.d_model, c.heads, c.dropout)
        self.cross_attn = Attention(c.d_model, c.heads, c.dropout)
        self.ff = FeedForward(c.d_model, c.ff, c.dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, y, memory, memory_padding, padding):
        y = y + self.drop(self.self_attn(self.norm1(y), key_padding=padding, causal=True))
        y = y + self.drop(self.cross_attn(self.norm2(y), memory, key_padding=memory_padding))
        return y + self.drop(self.ff(self.norm3(y)))

    def step(
        self,
        y: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor],
        cross: tuple[torch.Tensor, torch.Tensor],
        self_mask: torch.Tensor,
        cross_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward` for one new position ``y`` [B,1,D], given the cached keys/values.

        Args:
            y: the new position's input.
            past: self-attention keys and values of the earlier positions, ``[B,H,T,D/H]``.
            cross: cross-attention keys and values of the source, ``[B,H,S,D/H]``.
            self_mask: ``[B,1,1,T+1]``, True at the keys (earlier ones and its own) it may see.
            cross_mask: ``[B,1,1,S]``, True at the real source positions.

        Returns:
            The new position's output ``[B,1,D]`` and the keys/values extended by its own.
        """
        h = self.norm1(y)
        k, v = self.self_attn.keys_values(h)
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = y + self.drop(self.self_attn.attend(h, k, v, self_mask))
        y = y + self.drop(self.cross_attn.attend(self.norm2(y), *cross, cross_mask))
        return y + self.drop(self.ff(self.norm3(y))), (k, v)


@dataclass
class DecodeState:
    """What incremental decoding keeps between steps (from
    :meth:`Seq2SeqTransformer.start_decoding`; :meth:`Seq2SeqTransformer.decode_step` extends it).

    Every tensor has one row per sequence being decoded (dimension 0).

    Attributes:
        memory_padding: ``[B,S]``, True at padded source positions.
        cross: per decoder layer, the cross-attention keys and values of the source
            (``[B,heads,S,D/heads]`` each), computed once.
        past: per decoder layer, the self-attention keys and values of the tokens fed so far
            (``[B,heads,T,D/heads]`` each).
        padding: ``[B,T]``, True where the token fed was the pad (masked as a key, as in
            :meth:`Seq2SeqTransformer.decode`).
        sources: ``[B]``, the row of :meth:`Seq2SeqTransformer.start_decoding`'s memory each row
            decodes.
    """

    memory_padding: torch.Tensor
    cross: list[tuple[torch.Tensor, torch.Tensor]]
    past: list[tuple[torch.Tensor, torch.Tensor]]
    padding: torch.Tensor
    sources: torch.Tensor

    @property
    def length(self) -> int:
        """How many tokens have been fed (the position of the next one)."""
        return self.padding.shape[1]

    def reorder(self, indices: torch.Tensor) -> None:
        """Keep, in place, the rows ``indices`` [B'] (e.g. the parents of a beam search's new
        hypotheses; repeats allowed, so it also expands each source into several beams).

        Raises:
            IndexError: an index is out of range.
        """
        pick = lambda t: t.index_select(0, indices)  # noqa: E731
        sources = pick(self.sources)
        # Rows of one source share its cross keys/values and padding: when every row keeps its
        # source (a beam search's steps), only the self-attention cache needs copying.
        if not torch.equal(sources, self.sources):
            self.memory_padding = pick(self.memory_padding)
            self.cross = [(pick(k), pick(v)) for k, v in self.cross]
        self.sources, self.padding = sources, pick(self.padding)
        self.past = [(pick(k), pick(v)) for k, v in self.past]


def sinusoids(max_len: int, d_model: int) -> torch.Tensor:
    """The fixed sinusoidal position table ``[max_len, d_model]`` of "Attention is all you need"."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(1e4) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return table


class Embedding(nn.Module):
    """Token embedding (scaled by sqrt(d_model)) plus fixed sinusoidal positions, then dropout."""

    def __init__(self, vocab_size: int, c: TransformerConfig, pad_id: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, c.d_model, padding_idx=pad_id)
        nn.init.normal_(self.tokens.weight, std=c.d_model**-0.5)
        with torch.no_grad():
            self.tokens.weight[pad_id].zero_()
        self.positions: torch.Tensor
        self.register_buffer("positions", sinusoids(c.max_len, c.d_model), persistent=False)
        self.scale, self.max_len = math.sqrt(c.d_model), c.max_len
        self.drop = nn.Dropout(c.dropout)

    def forward(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = ids.shape[1]
        if offset + t > self.max_len:
            raise ValueError(
                f"sequence of {offset + t} tokens is longer than max_len {self.max_len}"
            )
        return self.drop(self.tokens(ids) * self.scale + self.positions[offset : offset + t])


class Encoder(nn.Module):
    def __init__(self, c: TransformerConfig, embed: Embedding) -> None:
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.d_model)

    def forward(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, padding)
        return self.norm(x)


class TransformerClassifier(nn.Module):
    """Encoder + masked mean pooling over the real tokens + a linear head.

    Args:
        vocab_size: tokenizer vocabulary size.
        num_classes: output classes.
        config: sizes.
        pad_id: the ``<pad>`` id (masked out of attention and pooling).

    ``forward(input_ids [B,T]) -> logits [B, num_classes]``.
    """

    def __init__(self, vocab_size: int, num_classes: int, config: TransformerConfig, pad_id: int):
        super().__init__()
        self.config, self.pad_id = config, pad_id
        self.encoder = Encoder(config, Embedding(vocab_size, config, pad_id))
        self.head = nn.Linear(config.d_model, num_classes)

    def fsdp_units(self) -> list[nn.Module]:
        """The layers FSDP shards and gathers one at a time (see
        ``kubetrain.train.distributed.shard_units``): each encoder layer."""
        return list(self.encoder.layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        padding = input_ids == self.pad_id
        h = self.encoder(input_ids, padding)
        keep = (~padding).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.head(pooled)


class Seq2SeqTransformer(nn.Module):
    """Pre-norm encoder-decoder with one embedding shared by source, target and output layer.

    Args:
        vocab_size: the (joint) tokenizer vocabulary size.
        config: sizes (``decoder_layers`` defaults to ``layers``).
        pad_id, bos_id, eos_id: the tokenizer's special ids.

    ``forward(src [B,S], tgt_in [B,T]) -> logits [B,T,vocab]`` (teacher forcing: ``tgt_in`` is
    the target without its last token, the labels are the target without its first).
    """

    def __init__(
        self, vocab_size: int, config: TransformerConfig, pad_id: int, bos_id: int, eos_id: int
    ) -> None:
        super().__init__()
        self.config, self.pad_id, self.bos_id, self.eos_id = config, pad_id, bos_id, eos_id
        self.embed = Embedding(vocab_size, config, pad_id)
        self.encoder = Encoder(config, self.embed)
        n_dec = config.decoder_layers if config.decoder_layers is not None else config.layers
        self.decoder = cast(
            "list[DecoderLayer]", nn.ModuleList(DecoderLayer(config) for _ in range(n_dec))
        )  # a ModuleList (registered, saved), typed by what it holds
        self.norm = nn.LayerNorm(config.d_model)
        # An nn.Linear (so it quantizes with the rest) whose weight *is* the embedding's.
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed.tokens.weight

    def fsdp_units(self) -> list[nn.Module]:
        """The layers FSDP shards and gathers one at a time (see
        ``kubetrain.train.distributed.shard_units``): each encoder and decoder layer."""
        return [*self.encoder.layers, *self.decoder]

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(memory [B,S,D], source padding [B,S])``."""
        padding = src == self.pad_id
        return self.encoder(src, padding), padding

    def decode(self, tgt_in, memory, memory_padding) -> torch.Tensor:
        """Logits ``[B,T,vocab]`` for every position of ``tgt_in``."""
        padding = tgt_in == self.pad_id
        y = self.embed(tgt_in)
        for layer in self.decoder:
            y = layer(y, memory, memory_padding, padding)
        return self.lm_head(self.norm(y))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, memory_padding = self.encode(src)
        return self.decode(tgt_in, memory, memory_padding)

    def start_decoding(self, memory: torch.Tensor, memory_padding: torch.Tensor) -> DecodeState:
        """Begin incremental decoding of the sources encoded as ``memory``.

        Computes each decoder layer's cross-attention keys and values once; the self-attention
        cache starts empty (feed ``<s>`` first).

        Args:
            memory: ``[B,S,D]`` from :meth:`encode`.
            memory_padding: ``[B,S]`` from :meth:`encode`, True at padded positions.

        Returns:
            The state for :meth:`decode_step`.
        """
        b, heads = memory.shape[0], self.config.heads
        empty = memory.new_zeros(b, heads, 0, self.config.d_model // heads)
        return DecodeState(
            memory_padding=memory_padding,
            cross=[layer.cross_attn.keys_values(memory) for layer in self.decoder],
            past=[(empty, empty) for _ in self.decoder],
            padding=memory_padding.new_zeros(b, 0),
            sources=torch.arange(b, device=memory.device),
        )

    def decode_step(self, token_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed one token per row and get the logits of the next: the last position of
        :meth:`decode` over every token fed so far, with only the new token going through the
        decoder (its keys and values are appended to ``state``, in place).

        Args:
            token_ids: ``[B,1]``, the token at position ``state.length`` of each row.
            state: from :meth:`start_decoding` (and earlier steps, :meth:`DecodeState.reorder`).

        Returns:
            Logits ``[B,vocab]``.

        Raises:
            ValueError: ``token_ids`` is not ``[B,1]`` with the state's B, or the sequence would
                pass ``max_len`` positions.
        """
        if token_ids.dim() != 2 or token_ids.shape != (state.padding.shape[0], 1):
            raise ValueError(
                f"decode_step takes one token per row, [{state.padding.shape[0]}, 1]; "
                f"got {list(token_ids.shape)}"
            )
        y = self.embed(token_ids, offset=state.length)
        padding = torch.cat([state.padding, token_ids == self.pad_id], dim=1)
        # One query, the newest position: it may see every earlier key, so the causal mask of
        # decode reduces to the padding mask.
        self_mask = ~padding[:, None, None, :]
        cross_mask = ~state.memory_padding[:, None, None, :]
        past = []
        for layer, kv, cross in zip(self.decoder, state.past, state.cross, strict=True):
            y, kv = layer.step(y, kv, cross, self_mask, cross_mask)
            past.append(kv)
        state.past, state.padding = past, padding
        return self.lm_head(self.norm(y[:, 0]))


def build_text_model(name: str, meta: TextSpec, config: TransformerConfig) -> nn.Module:
    """The built-in text model ``name`` for a text dataset, sized by ``config``.

    Args:
        name: ``transformer`` (needs a ``text_classification`` dataset) or
            ``seq2seq_transformer`` (needs ``seq2seq``).
        meta: the dataset's text spec (vocabulary, classes, special ids, ``max_length``).
        config: the sizes.

    Raises:
        ConfigError: the model does not fit the task, or ``max_len`` is below the data's
            ``max_length`` (the stored sequences would not fit).
    """
    from kubetrain.core.errors import ConfigError

    wanted = {"transformer": "text_classification", "seq2seq_transformer": "seq2seq"}
    if name not in wanted:
        raise ConfigError(f"config error: model.name: {name!r} is not a built-in text model")
    if meta.task != wanted[name]:
        raise ConfigError(
            f"config error: model.name: {name!r} needs data.task={wanted[name]!r}, the dataset "
            f"is {meta.task!r}"
        )
    if config.max_len < meta.max_length:
        raise ConfigError(
            f"config error: model max_len {config.max_len} is below data.max_length "
            f"{meta.max_length}: raise it or shorten the data"
        )
    sp = meta.special_ids
    if name == "transformer":
        return TransformerClassifier(meta.vocab_size, len(meta.classes or []), config, sp["pad"])
    return Seq2SeqTransformer(meta.vocab_size, config, sp["pad"], sp["bos"], sp["eos"])
