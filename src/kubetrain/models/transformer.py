"""Transformers for text: an encoder classifier and a pre-norm encoder-decoder, with greedy and
beam-search decoding and a label-smoothed loss.

Attention is built from plain ``nn.Linear`` q/k/v/o projections and
``F.scaled_dot_product_attention`` (not ``nn.MultiheadAttention``, whose input projection is a
raw parameter): every projection is an ``nn.Linear``, so int8 quantization covers all of them and
the model exports. Padding is masked everywhere (keys in self- and cross-attention, the pooled
classifier), so a padded sequence gives the outputs of the same sequence alone (tested).

The models know nothing of distribution or of the tokenizer beyond three ids (pad, bos, eos).
Sizes come from :class:`TransformerConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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
    """Multi-head attention from four ``nn.Linear`` layers and ``scaled_dot_product_attention``."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

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
        kv = x if memory is None else memory
        b, t, d = x.shape
        s = kv.shape[1]
        split = lambda y, n: y.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x), t), split(self.k(kv), s), split(self.v(kv), s)
        mask = None  # boolean, True = may attend
        if key_padding is not None:
            mask = ~key_padding[:, None, None, :]
        if causal:
            allowed = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(s - t)
            mask = allowed if mask is None else mask & allowed
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o(out.transpose(1, 2).reshape(b, t, d))


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
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(n_dec))
        self.norm = nn.LayerNorm(config.d_model)
        # An nn.Linear (so it quantizes with the rest) whose weight *is* the embedding's.
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed.tokens.weight

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


def label_smoothed_loss(
    logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.1, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy with label smoothing over the non-ignored positions.

    Args:
        logits: ``[..., classes]`` (e.g. ``[B,T,V]`` of a decoder).
        targets: ``[...]`` class ids; ``ignore_index`` (the pad id for sequences) is left out.
        smoothing: the share of probability spread evenly over all classes (0 = plain CE).

    Returns:
        A scalar tensor.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=smoothing,
    )


def seq2seq_loss(model: Seq2SeqTransformer, src, tgt, smoothing: float = 0.1) -> torch.Tensor:
    """Teacher-forced, label-smoothed loss of ``tgt`` (``<s> ... </s>``, padded) given ``src``."""
    logits = model(src, tgt[:, :-1])
    return label_smoothed_loss(logits, tgt[:, 1:], smoothing, ignore_index=model.pad_id)


def _finish(ys: torch.Tensor, eos_id: int, pad_id: int) -> list[list[int]]:
    out = []
    for row in ys.tolist():
        seq = []
        for tok in row[1:]:  # drop <s>
            if tok == eos_id:
                break
            seq.append(tok)
        out.append(seq)
    return out


@torch.no_grad()
def greedy_decode(
    model: Seq2SeqTransformer, src: torch.Tensor, max_new_tokens: int = 64
) -> list[list[int]]:
    """The most likely next token at every step, until ``</s>`` or ``max_new_tokens``.

    Returns:
        Per source, the generated ids without ``<s>``/``</s>``.
    """
    model.eval()
    memory, mem_pad = model.encode(src)
    b = src.shape[0]
    ys = torch.full((b, 1), model.bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(b, dtype=torch.bool, device=src.device)
    for _ in range(min(max_new_tokens, model.config.max_len - 1)):
        nxt = model.decode(ys, memory, mem_pad)[:, -1].argmax(-1)
        # After </s> a row only pads (and pads are masked, so they change nothing).
        nxt = torch.where(done, torch.full_like(nxt, model.pad_id), nxt)
        ys = torch.cat([ys, nxt[:, None]], dim=1)
        done |= nxt == model.eos_id
        if bool(done.all()):
            break
    return _finish(ys, model.eos_id, model.pad_id)


@torch.no_grad()
def beam_search(
    model: Seq2SeqTransformer,
    src: torch.Tensor,
    beam_size: int = 4,
    max_new_tokens: int = 64,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Beam search: keep the ``beam_size`` best prefixes by summed log-probability each step.

    A hypothesis is finished at ``</s>`` or after ``max_new_tokens``; finished ones keep their
    slot (extended by padding at no cost). The answer is the finished hypothesis with the best
    ``log-probability / length**length_penalty`` (length counts ``</s>``). ``beam_size=1`` is
    greedy decoding.

    Returns:
        Per source, the best hypothesis's ids without ``<s>``/``</s>``.
    """
    model.eval()
    k, b = beam_size, src.shape[0]
    memory, mem_pad = model.encode(src)
    memory = memory.repeat_interleave(k, 0)
    mem_pad = mem_pad.repeat_interleave(k, 0)
    ys = torch.full((b * k, 1), model.bos_id, dtype=torch.long, device=src.device)
    scores = torch.full((b, k), float("-inf"), device=src.device)
    scores[:, 0] = 0.0  # one live hypothesis per source at the start
    done = torch.zeros(b * k, dtype=torch.bool, device=src.device)
    lengths = torch.zeros(b * k, device=src.device)
    for _ in range(min(max_new_tokens, model.config.max_len - 1)):
        logp = model.decode(ys, memory, mem_pad)[:, -1].float().log_softmax(-1)  # [b*k, V]
        vocab = logp.shape[-1]
        # A finished hypothesis has one continuation, padding, worth nothing.
        frozen = torch.full_like(logp, float("-inf"))
        frozen[:, model.pad_id] = 0.0
        logp = torch.where(done[:, None], frozen, logp)
        cand = (scores.view(-1, 1) + logp).view(b, k * vocab)
        scores, flat = cand.topk(k, dim=-1)
        parent = (flat // vocab) + torch.arange(b, device=src.device)[:, None] * k
        token = flat % vocab
        parent, token = parent.view(-1), token.view(-1)
        ys = torch.cat([ys[parent], token[:, None]], dim=1)
        was_done = done[parent]
        lengths = lengths[parent] + (~was_done).float()
        done = was_done | (token == model.eos_id)
        if bool(done.all()):
            break
    normed = scores.view(-1) / lengths.clamp(min=1) ** length_penalty
    best = normed.view(b, k).argmax(-1) + torch.arange(b, device=src.device) * k
    return _finish(ys[best], model.eos_id, model.pad_id)


def sequence_log_prob(model: Seq2SeqTransformer, src: torch.Tensor, ids: list[int]) -> float:
    """Summed log-probability that the model generates ``ids`` after ``<s>``, for one source
    ``src`` of shape ``[1,S]`` (end ``ids`` with ``</s>`` to score a finished sequence)."""
    model.eval()
    with torch.no_grad():
        tgt = torch.tensor([[model.bos_id, *ids]], dtype=torch.long, device=src.device)
        logp = model(src, tgt).float().log_softmax(-1)[0]
        return float(sum(logp[i, t] for i, t in enumerate(ids)))


def build_text_model(name: str, meta, config: TransformerConfig) -> nn.Module:
    """The built-in text model ``name`` for a text dataset, sized by ``config``.

    Args:
        name: ``transformer`` (needs a ``text_classification`` dataset) or
            ``seq2seq_transformer`` (needs ``seq2seq``).
        meta: the dataset's :class:`kubetrain.data.text.TextMeta` (vocabulary, classes,
            special ids, ``max_length``).
        config: the sizes.

    Raises:
        ConfigError: the model does not fit the task, or ``max_len`` is below the data's
            ``max_length`` (the stored sequences would not fit).
    """
    from kubetrain.errors import ConfigError

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
        return TransformerClassifier(meta.vocab_size, len(meta.classes), config, sp["pad"])
    return Seq2SeqTransformer(meta.vocab_size, config, sp["pad"], sp["bos"], sp["eos"])
