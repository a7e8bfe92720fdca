"""Hugging Face models from a local directory behind the built-in models' interface: tiny,
randomly initialised configs that the tests save themselves; no hub. (Integration tier: importing
transformers and building models costs more than the unit tier can spend.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from kubetrain.core.errors import ConfigError  # noqa: E402
from kubetrain.models.decoding import beam_search, greedy_decode  # noqa: E402
from kubetrain.models.hf import load_hf_model  # noqa: E402
from kubetrain.models.losses import seq2seq_loss  # noqa: E402

SPECIAL = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "cls": 4}
VOCAB = 40


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
        eos_token_id=3, decoder_start_token_id=2, forced_eos_token_id=None,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("bart")
    transformers.BartForConditionalGeneration(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, pad_token_id=0, num_labels=2,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("bert")
    transformers.BertForSequenceClassification(cfg).save_pretrained(out)
    return out


def test_seq2seq_from_a_local_directory_trains_and_decodes(bart_dir):
    model = load_hf_model(f"hf:{bart_dir}", "seq2seq", SPECIAL, max_len=16)
    src = torch.tensor([[5, 6, 7, 3], [8, 9, 3, 0]])
    tgt = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
    loss = seq2seq_loss(model, src, tgt)
    loss.backward()
    assert torch.isfinite(loss)
    assert greedy_decode(model, src, 6) == beam_search(model, src, 1, 6)
    assert len(beam_search(model, src, 3, 6)) == 2


def test_classifier_from_a_local_directory_masks_padding(bert_dir):
    model = load_hf_model(f"hf:{bert_dir}", "text_classification", SPECIAL, num_classes=5).eval()
    a, b = torch.tensor([4, 9, 7, 3, 11]), torch.tensor([4, 5])
    with torch.no_grad():
        together = model(torch.stack([a, F.pad(b, (0, 3))]))
        alone = torch.cat([model(a[None]), model(b[None])])
    assert together.shape == (2, 5)  # the saved 2-class head is re-made with 5 classes
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("hf:bert-base-uncased", "no such directory .*hub ids are not downloaded"),
        ("hf:facebook/bart-base", "no such directory .*hub ids are not downloaded"),
        ("bert", "is not 'hf:<directory>'"),
    ],
    ids=["hub-id", "hub-org-id", "no-prefix"],
)
def test_hub_ids_are_one_line_errors(name, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        load_hf_model(name, "seq2seq", SPECIAL)
    assert "\n" not in str(info.value)


def test_a_directory_without_a_model(tmp_path):
    with pytest.raises(ConfigError, match="no config.json in that directory"):
        load_hf_model(f"hf:{tmp_path}", "seq2seq", SPECIAL)
