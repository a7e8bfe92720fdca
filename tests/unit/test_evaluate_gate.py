"""The task-aware evaluation (kubetrain.evaluate.config, kubetrain.core.artifacts): the primary metric
per kind of data, the promotion bar (``min_value``, ``min_accuracy`` its classification alias),
metrics.json with the primary and the extra metrics, and the gate on them; all on hand-made
scores (no model)."""

from __future__ import annotations

import json

import pytest

from kubetrain.core.artifacts import (
    Evaluation,
    Latency,
    Promotion,
    Scores,
    SearchResult,
    Sizes,
    TrainEfficiency,
    gate_reason,
    is_promotable,
)
from kubetrain.core.errors import ConfigError
from kubetrain.evaluate.config import EvaluateConfig
from kubetrain.pipeline.config import load_config
from kubetrain.pipeline.params import split_sets
from kubetrain.pipeline.steps import promotion_bar
from tests.factories import epoch, quant_info

CLASSES = ["cat", "dog", "<b>fox</b>"]


def classification_values(accuracy: float, **extra) -> dict:
    return {
        "accuracy": accuracy,
        "per_class_accuracy": {"cat": 1.0, "dog": 0.5, "<b>fox</b>": None},
        "confusion_matrix": [[2, 0, 0], [1, 1, 0], [0, 0, 0]],
        **extra,
    }


def seq2seq_values(bleu: float, rouge_l: float) -> dict:
    return {
        "bleu": bleu,
        "rouge_l": rouge_l,
        "copy_baseline_bleu": 0.20,
        "copy_baseline_rouge_l": 0.40,
    }


def evaluation(fp32: Scores, int8: Scores, kind: str, min_value: float,
               classes=None) -> Evaluation:  # fmt: skip
    """An Evaluation around hand-made scores (the rest: plausible constants)."""
    train = TrainEfficiency(
        seconds=1.0, step_seconds=0.01, samples_per_second=100.0, data_wait_share=0.1,
        world_size=1, ranks_identical=True, epochs=1,
    )  # fmt: skip
    return Evaluation(
        fp32=fp32,
        int8=int8,
        latency=[Latency(1, 2.0, 1.0, tokens=32), Latency(64, 20.0, 10.0, tokens=2048)],
        latency_threads=1,
        sizes=Sizes(4000, 1000, 5000, 2000, 4100),
        train=train,
        quantization=quant_info(),
        search=SearchResult.disabled(),
        history=[epoch()],
        classes=classes,
        dataset_version="v1",
        test_samples=3,
        min_value=min_value,
        kind=kind,
    )


@pytest.mark.parametrize(
    ("kind", "metric", "expected"),
    [
        ("tabular", None, "accuracy"),
        ("images", None, "accuracy"),
        ("images", "top5_accuracy", "top5_accuracy"),
        ("text_classification", "macro_f1", "macro_f1"),
        ("seq2seq", None, "bleu"),
        ("seq2seq", "rouge_l", "rouge_l"),
    ],
    ids=["tabular", "images", "images-top5", "text-macro-f1", "seq2seq", "summarization"],
)
def test_primary_metric_per_kind(kind, metric, expected):
    assert EvaluateConfig(metric=metric).primary_metric(kind) == expected


@pytest.mark.parametrize(
    ("kind", "metric"),
    [("seq2seq", "accuracy"), ("images", "bleu"), ("tabular", "macro_f1")],
    ids=["accuracy-for-seq2seq", "bleu-for-images", "macro-f1-for-tabular"],
)
def test_a_metric_that_does_not_fit_the_data_is_one_config_error(kind, metric):
    with pytest.raises(
        ConfigError, match=f"evaluate.metric: '{metric}' does not apply to a {kind}"
    ):
        EvaluateConfig(metric=metric).primary_metric(kind)


@pytest.mark.parametrize(
    ("sets", "bar"),
    [
        ([], 0.9),
        (["evaluate.min_accuracy=0.8"], 0.8),
        (["evaluate.min_value=0.7"], 0.7),
        (["evaluate.min_value=0.7", "evaluate.min_accuracy=0.8"], 0.7),
        (["data.task=seq2seq"], 0.0),
        (["data.task=seq2seq", "evaluate.min_value=0.25"], 0.25),
        (["data.task=seq2seq", "evaluate.min_accuracy=0.8"], 0.0),
    ],
    ids=["default", "min-accuracy", "min-value", "min-value-wins", "seq2seq-default",
         "seq2seq-min-value", "min-accuracy-is-not-a-seq2seq-bar"],
)  # fmt: skip
def test_the_promotion_bar_of_a_config(sets, bar):
    assert promotion_bar(load_config(overrides=sets)) == bar


def test_min_value_is_a_run_time_bar_like_min_accuracy():
    assert split_sets(["evaluate.min_value=0.3"]) == ([], {"min_accuracy": 0.3})


def test_classification_metrics_keep_their_keys_and_add_the_extra_ones():
    e = evaluation(
        Scores("accuracy", classification_values(0.95, top5_accuracy=0.99), [], samples_per_second=1000.0),
        Scores("accuracy", classification_values(0.94, top5_accuracy=0.98), [], samples_per_second=2000.0),
        "images", 0.9, CLASSES,
    )  # fmt: skip
    m = e.to_metrics()
    assert (m["test_accuracy_fp32"], m["test_accuracy_int8"]) == (0.95, 0.94)
    assert m["accuracy_drop_int8"] == pytest.approx(0.01)
    assert (m["min_accuracy"], m["min_value"], m["metric"]) == (0.9, 0.9, "accuracy")
    assert (m["test_top5_accuracy_fp32"], m["test_top5_accuracy_int8"]) == (0.99, 0.98)
    assert m["test_samples_per_second_int8"] == 2000.0
    assert m["tokens_per_second_b64_fp32"] == pytest.approx(2048 * 1e3 / 20.0)
    assert m["promoted"] is True
    assert "per_class_accuracy" not in json.dumps(list(m))  # per-class ones: details.json


def test_seq2seq_metrics_use_the_primary_metric_and_report_the_copy_baseline():
    e = evaluation(
        Scores("bleu", seq2seq_values(0.31, 0.52)),
        Scores("bleu", seq2seq_values(0.30, 0.50)),
        "seq2seq", 0.25,
    )  # fmt: skip
    m = e.to_metrics()
    assert (m["metric"], m["test_bleu_fp32"], m["test_bleu_int8"]) == ("bleu", 0.31, 0.30)
    assert m["bleu_drop_int8"] == pytest.approx(0.01)
    assert (m["test_rouge_l_fp32"], m["copy_baseline_bleu"], m["min_value"]) == (0.52, 0.2, 0.25)
    assert not any(k.startswith(("test_accuracy", "min_accuracy")) for k in m)
    assert m["promoted"] is True
    record = Promotion.from_metrics(m)
    assert (record.metric, record.test_value_int8, record.test_accuracy_fp32) == ("bleu", 0.3, None)


@pytest.mark.parametrize(
    ("fp32", "int8", "bar", "promoted", "why"),
    [
        (0.31, 0.30, 0.25, True, "clears the bar 0.2500"),
        (0.31, 0.24, 0.25, False, "below the bar 0.2500"),
        (0.31, 0.19, 0.0, False, "not above copying the source (0.2000)"),
        (0.20, 0.21, 0.0, False, "not above copying the source (0.2000)"),
    ],
    ids=["both-clear", "int8-below-bar", "int8-below-copy", "fp32-equals-copy"],
)
def test_the_seq2seq_gate(fp32, int8, bar, promoted, why):
    e = evaluation(
        Scores("bleu", seq2seq_values(fp32, 0.5)), Scores("bleu", seq2seq_values(int8, 0.5)),
        "seq2seq", bar,
    )  # fmt: skip
    m = e.to_metrics()
    assert e.promoted is promoted and m["promoted"] is promoted
    assert is_promotable(m, bar) is promoted
    assert gate_reason(m, bar) == f"test bleu fp32 {fp32:.4f} / int8 {int8:.4f} {why}"


def test_the_copy_baseline_can_be_left_out_of_the_gate():
    e = evaluation(
        Scores("bleu", seq2seq_values(0.1, 0.5)), Scores("bleu", seq2seq_values(0.1, 0.5)),
        "seq2seq", 0.0,
    )  # fmt: skip
    e.beat_copy_baseline = False
    assert e.promoted is True


@pytest.mark.parametrize("kind", ["seq2seq", "text_classification"])
def test_an_evaluation_round_trips_through_its_files(tmp_path, kind):
    if kind == "seq2seq":
        fp32 = Scores("rouge_l", seq2seq_values(0.31, 0.52),
                           [{"source": "a", "reference": "b", "prediction": "c"}], samples_per_second=50.0)  # fmt: skip
        int8 = Scores("rouge_l", seq2seq_values(0.30, 0.51), [], samples_per_second=60.0)
        e = evaluation(fp32, int8, kind, 0.45)
    else:
        fp32 = Scores("macro_f1", classification_values(0.9, macro_f1=0.8),
                           [{"text": "<i>x</i>", "true": "cat", "predicted": "dog"}])  # fmt: skip
        int8 = Scores("macro_f1", classification_values(0.9, macro_f1=0.79))
        e = evaluation(fp32, int8, kind, 0.75, CLASSES)
    e.save(tmp_path, "<p>report</p>")
    loaded = Evaluation.load(tmp_path)
    assert loaded.to_metrics() == json.loads(json.dumps(e.to_metrics()))
    assert loaded.fp32.examples == e.fp32.examples
    assert (loaded.metric, loaded.kind, loaded.promoted) == (e.metric, kind, True)


class FakeBleuTask:
    """Stands in for a registered task class: only its ``metric`` is read."""

    metric = "bleu"


@pytest.mark.parametrize(
    ("objective", "kind", "name"),
    [
        ("val_accuracy", "tabular", "val_accuracy"),
        ("val_accuracy", "fake_seq2seq", "val_bleu"),
        ("val_loss", "fake_seq2seq", "val_loss"),
        ("val_accuracy", "not_registered", "val_accuracy"),
    ],
    ids=["tabular", "the-tasks-metric", "loss", "unknown-kind"],
)
def test_the_search_objective_is_named_after_the_tasks_metric(monkeypatch, objective, kind,
                                                                  name):  # fmt: skip
    from kubetrain import tasks
    from kubetrain.tune.config import TuneConfig, objective_name

    monkeypatch.setitem(tasks.KINDS, "fake_seq2seq", "tests.unit.test_evaluate_gate:FakeBleuTask")
    assert objective_name(TuneConfig(objective_metric=objective), kind) == name
