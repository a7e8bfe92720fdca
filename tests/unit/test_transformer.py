"""The text Transformers: masks make padding invisible, every projection is an nn.Linear, tied
embeddings, greedy = beam 1, beam search finds the exhaustive optimum on a tiny model, the
label-smoothed loss, and a tiny model that learns to copy."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kubetrain.models.transformer import (
    Seq2SeqTransformer,
    TransformerClassifier,
    TransformerConfig,
    beam_search,
    greedy_decode,
    label_smoothed_loss,
    seq2seq_loss,
    sequence_log_prob,
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

    from kubetrain.errors import ConfigError
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
