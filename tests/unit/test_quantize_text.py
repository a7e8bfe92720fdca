"""int8 of the built-in text Transformers (kubetrain.quantize) and their evaluation, through the
real quantize driver and evaluation on small hand-built models.

The data comes from fake tasks (``FakeTextClassificationTask``, ``FakeSeq2SeqTask``:
fakes of kubetrain's own ``Task`` interface, not of a library): random token ids of varying
length whose labels (or reference outputs) are what the fp32 model itself predicts, so fp32
scores 1.0 and an int8 model's score is its agreement with fp32. Their metric named ``bleu`` is
a stand-in (token agreement), not BLEU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetrain.core.artifacts import Evaluation, SearchResult, TrainedModel
from kubetrain.core.errors import ConfigError
from kubetrain.evaluate import compare, report
from kubetrain.evaluate.config import EvaluateConfig
from kubetrain.models.decoding import greedy_decode
from kubetrain.models.transformer import (
    Seq2SeqTransformer,
    TransformerClassifier,
    TransformerConfig,
)
from kubetrain.quantize.driver import load_quantized, quantize_artifact
from kubetrain.tasks.base import Scores, Task
from tests.conftest import InMemoryTask, quick_quantize_config
from tests.factories import model_spec, train_summary

VOCAB, LENGTH, PAD, BOS, EOS = 200, 20, 0, 1, 2
SIZES = TransformerConfig(d_model=32, heads=2, layers=1, ff=64, dropout=0.0, max_len=32)
CLASSES = ["a", "b", "c"]


def classifier() -> TransformerClassifier:
    torch.manual_seed(0)
    return TransformerClassifier(VOCAB, len(CLASSES), SIZES, PAD).eval()


def seq2seq() -> Seq2SeqTransformer:
    torch.manual_seed(0)
    return Seq2SeqTransformer(VOCAB, SIZES, PAD, BOS, EOS).eval()


def token_ids(n: int, seed: int) -> torch.Tensor:
    """``n`` rows of random ids, each padded after a random length (4..LENGTH)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, LENGTH), generator=gen)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=gen)
    ids[torch.arange(LENGTH)[None, :] >= lengths[:, None]] = PAD
    return ids


def trimmed(ids: torch.Tensor) -> torch.Tensor:
    """A batch cut to its longest row, as length-bucketed text batches come."""
    return ids[:, : int((ids != PAD).sum(1).max())]


class _FakeText(InMemoryTask):
    """What the two fakes share: splits of random token ids, the model from ``factory``."""

    factory = staticmethod(classifier)

    def __init__(self, root: Path, n: int = 96) -> None:
        meta = {"kind": self.kind, "input_shape": [LENGTH], "version": "fake",
                "sizes": {"train": n, "val": n, "test": n},
                "classes": CLASSES if self.kind == "text_classification" else None}  # fmt: skip
        reference = self.factory()
        x = {s: token_ids(n, seed) for seed, s in enumerate(("train", "val", "test"))}
        with torch.no_grad():
            y = {s: self.reference_output(reference, ids) for s, ids in x.items()}
        super().__init__(root, meta, x, y)


class FakeTextClassificationTask(_FakeText):
    kind = "text_classification"

    @staticmethod
    def reference_output(model, x):
        return model(x).argmax(1)

    def score(self, model, split: str) -> Scores:
        x, y = self.x[split], self.y[split]
        with torch.no_grad():
            pred = torch.cat(
                [model(trimmed(x[i : i + 32])).argmax(1) for i in range(0, len(x), 32)]
            )
        accuracy = float((pred == y).float().mean())
        examples = [{"text": "ids " + str(x[i, :4].tolist()), "true": CLASSES[y[i]],
                     "predicted": CLASSES[pred[i]]} for i in range(len(y)) if pred[i] != y[i]]  # fmt: skip
        return Scores("accuracy", {"accuracy": accuracy, "macro_f1": accuracy}, examples[:32],
                      samples=len(y), seconds=1.0)  # fmt: skip


class FakeSeq2SeqTask(_FakeText):
    kind = "seq2seq"
    factory = staticmethod(seq2seq)
    STEPS = 6

    @classmethod
    def reference_output(cls, model, x):
        """``<s>`` + the fp32 model's greedy output (padded): the target ids of the split."""
        out = greedy_decode(model, x, cls.STEPS)
        rows = [[BOS, *seq, EOS] + [PAD] * (cls.STEPS + 2) for seq in out]
        return torch.tensor([r[: cls.STEPS + 2] for r in rows])

    def score(self, model, split: str) -> Scores:
        x, y = self.x[split], self.y[split][:, 1:]
        with torch.no_grad():  # decoding calls encode/decode: the model must keep them
            pred = self.reference_output(model, trimmed(x))[:, 1:]
        agree = float((pred == y).float().mean())
        copy = float((x[:, : y.shape[1]] == y).float().mean())
        examples = [{"source": str(x[i, :5].tolist()), "reference": str(y[i].tolist()),
                     "prediction": str(pred[i].tolist())} for i in range(3)]  # fmt: skip
        values = {"bleu": agree, "rouge_l": agree, "copy_baseline_bleu": copy,
                  "copy_baseline_rouge_l": copy}  # fmt: skip
        return Scores("bleu", values, examples, samples=len(y), seconds=1.0)


def model_dir(root: Path, model: torch.nn.Module) -> Path:
    """A model artifact of ``model`` as the train step writes it."""
    TrainedModel(None, model_spec(), [], train_summary(), model.state_dict()).save(root / "model")
    return root / "model"


WORKLOADS = {"classifier": FakeTextClassificationTask, "seq2seq": FakeSeq2SeqTask}


@pytest.fixture(scope="module", params=list(WORKLOADS))
def quantized(request, tmp_path_factory):
    """Each text model through ``quantize.method=auto`` (no gate: its mechanics are tested on
    tabular models; here what is built, saved, reloaded and measured)."""
    root = tmp_path_factory.mktemp(request.param)
    task = WORKLOADS[request.param](root)
    mdir = model_dir(root, task.factory())
    qcfg = quick_quantize_config(method="auto", max_accuracy_drop=1.0)
    info = quantize_artifact(mdir, root, root / "quant", qcfg, task=task)
    return root, task, mdir, info


def test_auto_tries_only_the_linear_layer_methods_on_a_text_model(quantized):
    _, task, _, info = quantized
    names = [c.name for c in info.candidates]
    assert names == ["weight_only_int8/torchao", "dynamic_int8/torchao", "dynamic_int8/fbgemm"]
    assert info.metric == ("accuracy" if task.kind == "text_classification" else "bleu")
    for c in info.candidates:
        assert "error" not in c, c
        assert c.format == "state_dict" and c.size_ratio < 0.8  # embeddings stay fp32
        assert c.accuracy_drop == pytest.approx(1.0 - c.val_metric)  # fp32 scores 1.0
        assert c.val_metric >= 0.5  # int8 agrees with fp32 on most samples/tokens
        assert c.tokens_per_second_b1 > 0 and c.tokens_per_second_b64 > 0


def test_the_saved_int8_model_reloads_with_its_methods_and_scores_the_same(quantized):
    root, task, mdir, info = quantized
    model = load_quantized(root / "quant", mdir, task)
    assert type(model) is type(task.factory())  # encode/decode and special ids survive
    assert task.score(model, "val").value == pytest.approx(info.val_metric)
    assert json.loads((root / "quant" / "quant.json").read_text())["file"] == "model_state.pt"


def test_a_text_model_evaluates_on_its_metric_with_tokens_per_second(quantized):
    root, task, mdir, _ = quantized
    data = task.data
    e = compare.evaluate(EvaluateConfig(latency_repeats=3), data, mdir, root / "quant",
                         SearchResult.disabled(), task=task)  # fmt: skip
    e.save(root / "eval", report.render(e))
    m = Evaluation.load_metrics(root / "eval")
    metric = m["metric"]
    assert metric == info_metric(task)
    assert m[f"test_{metric}_fp32"] == 1.0
    assert m["latency_tokens_b64"] == 64 * (LENGTH + (7 if task.kind == "seq2seq" else 0))
    assert m["tokens_per_second_b64_int8"] > 0
    assert ("copy_baseline_bleu" in m) is (task.kind == "seq2seq")


def info_metric(task: Task) -> str:
    return "accuracy" if task.kind == "text_classification" else "bleu"


@pytest.mark.parametrize("method", ["static_int8", "qat_int8"])
def test_an_explicit_method_that_does_not_apply_to_a_text_model_says_why(tmp_path, method):
    task = FakeTextClassificationTask(tmp_path, n=8)
    mdir = model_dir(tmp_path, task.factory())
    qcfg = quick_quantize_config(method=method)
    with pytest.raises(ConfigError) as err:
        quantize_artifact(mdir, tmp_path, tmp_path / "quant", qcfg, task=task)
    message = str(err.value)
    assert "\n" not in message and "does not apply to a text model" in message
    assert message.startswith(f"config error: quantize.method: {method}/x86_inductor")
    assert not (tmp_path / "quant" / "quant.json").exists()


class _MetricFromConfig(FakeSeq2SeqTask):
    """Scores on ``evaluate.metric`` as the real seq2seq task does."""

    def score(self, model, split: str) -> Scores:
        scores = super().score(model, split)
        return Scores(self.scoring.metric or "bleu", scores.values, scores.examples,
                      samples=scores.samples, seconds=scores.seconds)  # fmt: skip


@pytest.mark.parametrize("metric", [None, "rouge_l"], ids=["trained-with", "evaluate-section"])
def test_the_gate_measures_on_the_evaluate_sections_metric(tmp_path, metric):
    """The quantize step gets the evaluate section: the gate measures what evaluate will (the
    summarization recipe's ROUGE-L, not the BLEU of the settings the model was trained with)."""
    task = _MetricFromConfig(tmp_path, n=16)
    mdir = model_dir(tmp_path, task.factory())
    qcfg = quick_quantize_config(method="dynamic_int8", max_accuracy_drop=1.0)
    evaluate = EvaluateConfig(metric=metric) if metric else None
    info = quantize_artifact(mdir, tmp_path, tmp_path / "q", qcfg, task=task,
                             scoring=evaluate)  # fmt: skip
    assert info.metric == (metric or "bleu")
