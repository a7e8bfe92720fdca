"""Decoding a seq2seq model: greedy and beam search, through the model's key/value cache when it has
one (``Seq2SeqTransformer.start_decoding`` / ``decode_step``) and by re-decoding every prefix when
it has only ``encode`` / ``decode`` (the Hugging Face wrapper, a user's model).

The models are duck-typed (``Any``): any module with ``encode``, ``decode``, ``config.max_len`` and
the ``pad_id``, ``bos_id``, ``eos_id`` it was built with decodes here.
"""

from __future__ import annotations

from typing import Any

import torch

from kubetrain.models.transformer import DecodeState


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


class _NextToken:
    """Next-token logits ``[B,V]`` of the prefixes ``ys`` [B,T], one step after another.

    Through the model's key/value cache (``start_decoding`` / ``decode_step``, as
    :class:`Seq2SeqTransformer` has) when it has one: then each call feeds only ``ys``'s last
    column. Otherwise (e.g. :class:`kubetrain.models.hf.HFSeq2Seq`, a user's model with only
    ``encode``/``decode``) it re-decodes the whole prefix each step.
    """

    def __init__(
        self, model: Any, memory: torch.Tensor, memory_padding: torch.Tensor, beams: int = 1
    ) -> None:
        """``beams`` rows per source (each source's rows side by side). ``model``: any module
        with ``encode``/``decode`` (duck-typed: the built-in, an ``hf:`` or a user's model)."""
        self.model: Any = model
        self.state: DecodeState | None = None
        cached = callable(getattr(model, "start_decoding", None)) and callable(
            getattr(model, "decode_step", None)
        )
        if cached:  # cross keys/values computed once per source, then copied to its beams
            self.state = model.start_decoding(memory, memory_padding)
            if beams > 1:
                rows = torch.arange(memory.shape[0], device=memory.device)
                self.state.reorder(rows.repeat_interleave(beams))
        else:
            self.memory = memory.repeat_interleave(beams, 0)
            self.memory_padding = memory_padding.repeat_interleave(beams, 0)

    def __call__(self, ys: torch.Tensor) -> torch.Tensor:
        if self.state is not None:
            return self.model.decode_step(ys[:, -1:], self.state)
        return self.model.decode(ys, self.memory, self.memory_padding)[:, -1]

    def reorder(self, parent: torch.Tensor) -> None:
        """The rows of ``ys`` become ``ys[parent]`` (the re-decoding path needs nothing: a
        beam's parent shares its source, so the memory rows stay right)."""
        if self.state is not None:
            self.state.reorder(parent)


@torch.no_grad()
def greedy_decode(model: Any, src: torch.Tensor, max_new_tokens: int = 64) -> list[list[int]]:
    """The most likely next token at every step, until ``</s>`` or ``max_new_tokens`` (or the
    model's ``max_len``). A row that has ended feeds padding until all have.

    Args:
        model: a :class:`Seq2SeqTransformer` (decoded step by step through its key/value cache)
            or any model with ``encode``, ``decode``, ``config.max_len`` and the
            ``pad_id``/``bos_id``/``eos_id`` attributes (the whole prefix is re-decoded each
            step); the tokens are the same either way.
        src: source ids ``[B,S]``, padded with ``model.pad_id``.
        max_new_tokens: most tokens generated per source (``</s>`` included).

    Returns:
        Per source, the generated ids without ``<s>``/``</s>``.

    Raises:
        ValueError: the source is longer than the model's ``max_len``.
    """
    model.eval()
    memory, mem_pad = model.encode(src)
    next_logits = _NextToken(model, memory, mem_pad)
    b = src.shape[0]
    ys = torch.full((b, 1), model.bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(b, dtype=torch.bool, device=src.device)
    for _ in range(min(max_new_tokens, model.config.max_len - 1)):
        nxt = next_logits(ys).argmax(-1)
        # After </s> a row only pads (and pads are masked, so they change nothing).
        nxt = torch.where(done, torch.full_like(nxt, model.pad_id), nxt)
        ys = torch.cat([ys, nxt[:, None]], dim=1)
        done |= nxt == model.eos_id
        if bool(done.all()):
            break
    return _finish(ys, model.eos_id, model.pad_id)


@torch.no_grad()
def beam_search(
    model: Any,
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

    Args:
        model: as for :func:`greedy_decode` (the key/value cache is reordered with the beams).
        src: source ids ``[B,S]``, padded with ``model.pad_id``.
        beam_size: hypotheses kept per source.
        max_new_tokens: most tokens generated per hypothesis (``</s>`` included).
        length_penalty: exponent of the length normalisation (0 = raw log-probability).

    Returns:
        Per source, the best hypothesis's ids without ``<s>``/``</s>``.

    Raises:
        ValueError: the source is longer than the model's ``max_len``.
    """
    model.eval()
    k, b = beam_size, src.shape[0]
    memory, mem_pad = model.encode(src)
    next_logits = _NextToken(model, memory, mem_pad, beams=k)
    ys = torch.full((b * k, 1), model.bos_id, dtype=torch.long, device=src.device)
    scores = torch.full((b, k), float("-inf"), device=src.device)
    scores[:, 0] = 0.0  # one live hypothesis per source at the start
    done = torch.zeros(b * k, dtype=torch.bool, device=src.device)
    lengths = torch.zeros(b * k, device=src.device)
    for _ in range(min(max_new_tokens, model.config.max_len - 1)):
        logp = next_logits(ys).float().log_softmax(-1)  # [b*k, V]
        vocab = logp.shape[-1]
        if bool(done.any()):  # (rewriting [B*k, V] every step was ~9 % of cached beam search)
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
        next_logits.reorder(parent)
        was_done = done[parent]
        lengths = lengths[parent] + (~was_done).float()
        done = was_done | (token == model.eos_id)
        if bool(done.all()):
            break
    normed = scores.view(-1) / lengths.clamp(min=1) ** length_penalty
    best = normed.view(b, k).argmax(-1) + torch.arange(b, device=src.device) * k
    return _finish(ys[best], model.eos_id, model.pad_id)


def sequence_log_prob(model: Any, src: torch.Tensor, ids: list[int]) -> float:
    """Summed log-probability that the model generates ``ids`` after ``<s>``, for one source
    ``src`` of shape ``[1,S]`` (end ``ids`` with ``</s>`` to score a finished sequence)."""
    model.eval()
    with torch.no_grad():
        tgt = torch.tensor([[model.bos_id, *ids]], dtype=torch.long, device=src.device)
        logp = model(src, tgt).float().log_softmax(-1)[0]
        return float(sum(logp[i, t] for i, t in enumerate(ids)))
