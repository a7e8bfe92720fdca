"""The text Transformers: masks make padding invisible, every projection is an nn.Linear, tied
embeddings, greedy = beam 1, beam search finds the exhaustive optimum on a tiny model, the
label-smoothed loss, and a tiny model that learns to copy."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kubetrain.models.decoding import beam_search, greedy_decode, sequence_log_prob
from kubetrain.models.losses import label_smoothed_loss, seq2seq_loss
from kubetrain.models.transformer import (
    Seq2SeqTransformer,
    TransformerClassifier,
    TransformerConfig,
)

PAD, BOS, EOS = 0, 1, 2


def tiny(vocab=12, max_len=16, **kw) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    c = TransformerConfig(d_model=16, heads=2, layers=2, ff=32, dropout=0.0, max_len=max_len, **kw)
    return Seq2SeqTransformer(vocab, c, PAD, BOS, EOS).eval()


def test_padding_changes_nothing_in_the_classifier():
    torch.manual_seed(0)
    model = TransformerClassifier(
        50, 3, TransformerConfig(d_model=16, heads=2, layers=2, ff=32, dropout=0.0), PAD
    ).eval()
    a, b = torch.tensor([4, 9, 7, 3, 11]), torch.tensor([4, 5])
    padded = torch.stack([a, F.pad(b, (0, 3), value=PAD)])
    with torch.no_grad():
        together = model(padded)
        alone = torch.cat([model(a[None]), model(b[None])])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_padding_changes_nothing_in_the_seq2seq_model():
    model = tiny()
    src = [torch.tensor([5, 6, 7, EOS]), torch.tensor([8, EOS])]
    tgt = [torch.tensor([BOS, 3, 4, 5]), torch.tensor([BOS, 9])]
    pad = lambda xs: nn.utils.rnn.pad_sequence(xs, batch_first=True, padding_value=PAD)  # noqa: E731
    with torch.no_grad():
        together = model(pad(src), pad(tgt))
        for i in range(2):
            alone = model(src[i][None], tgt[i][None])[0]
            torch.testing.assert_close(together[i, : len(tgt[i])], alone, atol=1e-5, rtol=1e-5)


def test_every_projection_is_a_linear_and_embeddings_are_tied():
    model = tiny()
    assert model.lm_head.weight is model.embed.tokens.weight
    assert model.encoder.embed is model.embed
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    # 2 encoder layers x (4 attention + 2 ff) + 2 decoder layers x (8 attention + 2 ff) + head
    assert len(linears) == 2 * 6 + 2 * 10 + 1
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    params = {id(p) for p in model.parameters()}
    assert len(params) == len(list(model.parameters()))  # tied weight counted once


def test_greedy_equals_beam_of_one():
    model = tiny()
    src = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, PAD]])
    assert greedy_decode(model, src, 8) == beam_search(model, src, 1, 8)


def test_beam_search_finds_the_exhaustive_optimum():
    """With a beam as wide as every prefix, beam search must return the best sequence overall
    (raw log-probability, no length penalty)."""
    vocab, steps = 5, 3
    model = tiny(vocab=vocab)
    src = torch.tensor([[3, 4, EOS]])
    best, best_score = None, float("-inf")
    for seq in itertools.product(range(vocab), repeat=steps):
        seq = list(seq)
        if EOS in seq:
            seq = seq[: seq.index(EOS) + 1]
        score = sequence_log_prob(model, src, seq)
        if score > best_score + 1e-6:
            best, best_score = seq, score
    found = beam_search(model, src, vocab**steps, steps, length_penalty=0.0)[0]
    ended = [*found, EOS] if len(found) < steps else found
    assert sequence_log_prob(model, src, ended) == pytest.approx(best_score, abs=1e-5)
    assert ended == best
    # A narrow beam can only do as well or worse.
    narrow = beam_search(model, src, 2, steps, length_penalty=0.0)[0]
    narrow = [*narrow, EOS] if len(narrow) < steps else narrow
    assert sequence_log_prob(model, src, narrow) <= best_score + 1e-6


def test_label_smoothed_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
    targets = torch.tensor([[1, PAD]])  # the second position is padding: left out
    logp = logits[0, 0].log_softmax(-1)
    eps = 0.1
    expected = -(1 - eps) * logp[1] - eps * logp.mean()
    got = label_smoothed_loss(logits, targets, eps, ignore_index=PAD)
    assert float(got) == pytest.approx(float(expected), abs=1e-6)
    assert float(label_smoothed_loss(logits, targets, 0.0, PAD)) == pytest.approx(float(-logp[1]))


def test_a_tiny_model_learns_to_copy():
    torch.manual_seed(0)
    model = tiny(vocab=10, max_len=8).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        body = torch.randint(3, 10, (32, 4), generator=gen)
        src = torch.cat([body, torch.full((32, 1), EOS)], 1)
        tgt = torch.cat([torch.full((32, 1), BOS), body, torch.full((32, 1), EOS)], 1)
        loss = seq2seq_loss(model, src, tgt, smoothing=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    body = torch.randint(3, 10, (16, 4), generator=gen)
    src = torch.cat([body, torch.full((16, 1), EOS)], 1)
    out = greedy_decode(model, src, 6)
    right = sum(o == b for o, b in zip(out, body.tolist(), strict=True))
    assert right >= 12, (float(loss), right)


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="not divisible by heads"):
        TransformerConfig(d_model=10, heads=3)
    model = tiny(max_len=4)
    with pytest.raises(ValueError, match="longer than max_len 4"):
        model(torch.tensor([[3, 4, 5, 6, EOS]]), torch.tensor([[BOS]]))


def test_every_linear_quantizes_to_dynamic_int8():
    """The reason attention is built from nn.Linear: int8 covers every projection."""
    import warnings

    model = tiny()
    src, tgt = torch.tensor([[5, 6, 7, EOS]]), torch.tensor([[BOS, 3, 4]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic and its tensors are deprecated
        q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert not [m for m in q.modules() if type(m) is nn.Linear]  # none left in fp32
    with torch.no_grad():
        ref, got = model(src, tgt), q(src, tgt)
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() >= 0.5
    assert float((ref - got).abs().max()) < 0.5 * float(ref.abs().max())


@pytest.mark.parametrize(
    ("name", "task", "max_len", "expected"),
    [
        ("transformer", "text_classification", 64, TransformerClassifier),
        ("seq2seq_transformer", "seq2seq", 64, Seq2SeqTransformer),
        ("transformer", "seq2seq", 64, "needs data.task='text_classification'"),
        ("seq2seq_transformer", "seq2seq", 16, "max_len 16 is below data.max_length 32"),
        ("lstm", "seq2seq", 64, "not a built-in text model"),
    ],
    ids=["classifier", "seq2seq", "wrong-task", "max-len-too-small", "unknown"],
)
def test_build_text_model_from_dataset_meta(name, task, max_len, expected):
    from types import SimpleNamespace

    from kubetrain.core.errors import ConfigError
    from kubetrain.models.transformer import build_text_model

    meta = SimpleNamespace(
        task=task, max_length=32, vocab_size=30, classes=["a", "b", "c"],
        special_ids={"pad": 0, "unk": 1, "bos": 2, "eos": 3, "cls": 4},
    )  # fmt: skip
    size = TransformerConfig(d_model=16, heads=2, layers=1, ff=32, max_len=max_len)
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            build_text_model(name, meta, size)
    else:
        model = build_text_model(name, meta, size)
        assert type(model) is expected
        if name == "transformer":
            assert model(torch.tensor([[4, 7, 8]])).shape == (1, 3)


# --- Incremental decoding (key/value cache) against re-decoding the whole prefix each step ---


def random_decoder(vocab=12, max_len=24) -> Seq2SeqTransformer:
    """A seeded, untrained model whose decodings vary with the source and end at different
    lengths. Its layers are initialised wider than usual and its output layer is untied and
    random: else an untrained model only repeats ``<s>``, and any two decoders would agree."""
    model = tiny(vocab=vocab, max_len=max_len)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m is not model.lm_head:
                m.weight.normal_(0, m.in_features**-0.5)
    model.lm_head.weight = nn.Parameter(torch.randn(vocab, model.config.d_model))
    return model


def padded_sources() -> torch.Tensor:
    """Six sources of 9, 4, 6, 2, 9 and 7 tokens, padded to 9."""
    src = torch.randint(3, 12, (6, 9), generator=torch.Generator().manual_seed(1))
    for row, length in enumerate([9, 4, 6, 2, 9, 7]):
        src[row, length:] = PAD
    return src


def int8(model: nn.Module) -> nn.Module:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic and its tensors are deprecated
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


class FullRedecode(nn.Module):
    """A user's own model: only ``encode``/``decode`` and the ids, no cache, so decoding falls
    back to re-decoding the whole prefix every step. Counts its ``decode`` calls."""

    def __init__(self, model: Seq2SeqTransformer) -> None:
        super().__init__()
        self.model, self.config, self.calls = model, model.config, 0
        self.pad_id, self.bos_id, self.eos_id = model.pad_id, model.bos_id, model.eos_id

    def encode(self, src):
        return self.model.encode(src)

    def decode(self, tgt_in, memory, memory_padding):
        self.calls += 1
        return self.model.decode(tgt_in, memory, memory_padding)


def no_redecoding(*args):
    raise AssertionError("the cached path re-decoded the whole prefix")


DECODERS = {
    "greedy": lambda model, src, n: greedy_decode(model, src, n),
    "beam-1": lambda model, src, n: beam_search(model, src, 1, n),
    "beam-3": lambda model, src, n: beam_search(model, src, 3, n),
}


@pytest.mark.parametrize("decoder", DECODERS)
def test_cached_decoding_gives_the_tokens_of_full_redecoding(decoder, monkeypatch):
    model, src, steps = random_decoder(), padded_sources(), 12
    fallback = FullRedecode(model)
    expected = DECODERS[decoder](fallback, src, steps)
    assert fallback.calls > 0  # the model without a cache decoded by re-decoding
    monkeypatch.setattr(model, "decode", no_redecoding)
    assert DECODERS[decoder](model, src, steps) == expected
    # The case is worth testing: some rows end (then feed padding) before others.
    assert len({len(seq) for seq in expected}) > 1 and max(map(len, expected)) == steps


def step_by_step(model, src, tgt) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B,T,V]`` of ``decode`` over ``tgt`` and of ``decode_step`` fed it token by
    token."""
    with torch.no_grad():
        memory, memory_padding = model.encode(src)
        state = model.start_decoding(memory, memory_padding)
        steps = [model.decode_step(tgt[:, t : t + 1], state) for t in range(tgt.shape[1])]
        return model.decode(tgt, memory, memory_padding), torch.stack(steps, 1)


def targets() -> torch.Tensor:
    """``<s>`` and 9 tokens per source; rows 1 and 3 end early and then pad."""
    tgt = torch.randint(3, 12, (6, 10), generator=torch.Generator().manual_seed(2))
    tgt[:, 0], tgt[1, 5], tgt[1, 6:], tgt[3, 2:] = BOS, EOS, PAD, PAD
    return tgt


def test_step_logits_match_decode():
    model = random_decoder()
    full, steps = step_by_step(model, padded_sources(), targets())
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_an_int8_model_decodes_through_the_cache(monkeypatch):
    """Dynamic int8 quantizes each activation tensor with its own scale, so one new token and a
    whole prefix are rounded differently: the cached path cannot match re-decoding bit for bit
    (nor does re-decoding match itself across prefix lengths). It must stay as close to the
    float model as re-decoding is, and decode without re-decoding."""
    model, src, tgt = random_decoder(), padded_sources(), targets()
    q = int8(model)
    assert not [m for m in q.modules() if type(m) is nn.Linear]
    ref, _ = step_by_step(model, src, tgt)
    full, steps = step_by_step(q, src, tgt)
    full_err, step_err = (full - ref).abs().max(), (steps - ref).abs().max()
    assert 0 < step_err <= 2 * full_err and step_err < 0.1 * ref.abs().max()
    assert (steps.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    monkeypatch.setattr(q, "decode", no_redecoding)
    for decode in DECODERS.values():
        out = decode(q, src, 12)
        assert len(out) == len(src) and all(0 < len(seq) <= 12 for seq in out)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "re-decoding"])
@pytest.mark.parametrize(
    ("max_new_tokens", "length"),
    [(50, 9), (3, 3)],
    ids=["stops-at-max-len", "stops-at-max-new-tokens"],
)
@pytest.mark.parametrize("decoder", DECODERS)
def test_a_sequence_without_eos_stops_cleanly(decoder, max_new_tokens, length, cached):
    """A model of ``max_len`` 10 has room for ``<s>`` and 9 tokens."""
    model = random_decoder(max_len=10)
    model.eos_id = 12  # outside the vocabulary: never generated, so no row ends early
    out = DECODERS[decoder](
        model if cached else FullRedecode(model), padded_sources(), max_new_tokens
    )
    assert [len(seq) for seq in out] == [length] * 6


def test_decode_step_checks_its_input():
    model = random_decoder(max_len=9)
    memory, memory_padding = model.encode(padded_sources())
    state = model.start_decoding(memory, memory_padding)
    with pytest.raises(ValueError, match=r"one token per row, \[6, 1\]; got \[6, 2\]"):
        model.decode_step(torch.full((6, 2), BOS), state)
    for _ in range(9):
        model.decode_step(torch.full((6, 1), BOS), state)
    assert state.length == 9
    with pytest.raises(ValueError, match="10 tokens is longer than max_len 9"):
        model.decode_step(torch.full((6, 1), BOS), state)


@pytest.mark.parametrize(
    "reorders",
    [[[3, 3, 0, 5]], [[0, 0, 1, 1], [1, 0, 3, 3]], [[0, 1, 2, 3, 4, 5], [1, 0, 2, 3, 4, 5]]],
    ids=["pick-rows", "expand-then-swap-within-sources", "swap-sources"],
)
def test_reordering_the_state_keeps_the_chosen_rows(reorders):
    """Reordering between steps equals having decoded the chosen rows from the start (repeated
    indices expand a batch, as a beam search does with its sources, whose rows then reorder
    among themselves)."""
    model, src, tgt = random_decoder(), padded_sources(), targets()
    rows = torch.arange(len(src))
    with torch.no_grad():
        memory, memory_padding = model.encode(src)
        state = model.start_decoding(memory, memory_padding)
        for step, indices in enumerate(map(torch.tensor, reorders)):
            model.decode_step(tgt[rows, step : step + 1], state)
            state.reorder(indices)
            rows = rows[indices]
        got = model.decode_step(tgt[rows, len(reorders) : len(reorders) + 1], state)
        full = model.decode(tgt[rows, : len(reorders) + 1], memory[rows], memory_padding[rows])
    torch.testing.assert_close(got, full[:, -1], atol=1e-5, rtol=1e-5)
