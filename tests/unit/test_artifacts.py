"""The step contracts (kubetrain.core.artifacts): every artifact is complete only once its marker file
is written, and the evaluation's type writes the documented metrics.json and reads it back."""

from __future__ import annotations

import json

import pytest

from kubetrain.core import artifacts
from kubetrain.core.artifacts import (
    DatasetArtifact,
    Evaluation,
    Promotion,
    QuantizedModel,
    Rejection,
    SearchResult,
    TrainedModel,
)
from kubetrain.core.distributed import DistContext
from kubetrain.core.errors import DataError, KubetrainError
from kubetrain.core.records import SearchSummary, Trial
from kubetrain.data import load_dataset
from kubetrain.pipeline import steps
from kubetrain.pipeline.config import load_config
from kubetrain.tasks import open_task
from kubetrain.train.loop import fit, save_model

# metrics.json as the README documents it (keys that do not depend on the candidates tried).
DOCUMENTED_KEYS = [
    "test_accuracy_fp32", "test_accuracy_int8",
    "latency_ms_b1_fp32", "latency_ms_b1_int8", "latency_ms_b64_fp32", "latency_ms_b64_int8",
    "model_size_bytes_fp32", "model_size_bytes_int8", "model_file_bytes_fp32",
    "model_file_bytes_int8", "model_state_dict_bytes_fp32", "size_ratio_int8",
    "accuracy_drop_int8",
    "latency_ratio_b1_int8", "samples_per_second_b1_fp32", "samples_per_second_b1_int8",
    "latency_ratio_b64_int8", "samples_per_second_b64_fp32", "samples_per_second_b64_int8",
    "quantize_method", "quantize_candidate", "quantize_runtime", "quantize_decision",
    "latency_threads", "train_seconds", "train_step_seconds", "train_samples_per_second",
    "train_data_wait_share", "train_world_size", "train_ranks_identical", "train_epochs",
    "train_precision", "train_mfu", "train_flops_per_sample", "train_compute_share",
    "train_optimizer_share", "train_comm_seconds", "train_allreduce_calls", "train_cpu_percent",
    "train_peak_rss_mib", "train_rank_cpu_percent", "train_rank_peak_rss_mib",
    "train_gpu_peak_mib", "train_checkpoint_seconds", "train_checkpoints_written",
    "train_compile_seconds", "train_resumed_from_step", "train_restarts",
    "dataset_version", "test_samples", "min_accuracy", "metric", "min_value", "dataset_kind",
    "test_samples_per_second_fp32", "test_samples_per_second_int8", "promoted",
]  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, digits_dir):
    """A real model, its weight-only int8 twin and their evaluation (a disabled search)."""
    root = tmp_path_factory.mktemp("artifacts")
    cfg = load_config(
        overrides=[
            "train.nproc=1", "train.epochs=2", "quantize.method=weight_only_int8",
            "quantize.latency_repeats=3", "evaluate.latency_repeats=3", "quantize.qat_on_drop=false",
            "quantize.on_drop=keep_fp32",
        ]
    )  # fmt: skip
    data = load_dataset(digits_dir)
    task = open_task(cfg, data)
    save_model(fit(cfg, task, DistContext()), cfg, task, root / "model")
    steps.quantize(cfg, digits_dir, root / "model", root / "quant")
    metrics = steps.evaluate(cfg, digits_dir, root / "model", root / "quant", root / "eval")
    return root, metrics


def test_evaluation_writes_the_documented_metrics_and_reads_them_back(evaluated):
    root, metrics = evaluated
    names = [k for k in metrics if not k.startswith("quant_")]
    assert names == DOCUMENTED_KEYS
    assert json.loads((root / "eval" / artifacts.EVAL_METRICS).read_text()) == json.loads(
        json.dumps(metrics)
    )
    loaded = Evaluation.load(root / "eval")
    assert json.loads(json.dumps(loaded.to_metrics())) == json.loads(json.dumps(metrics))
    assert loaded.promoted is metrics["promoted"]
    assert [lat.batch_size for lat in loaded.latency] == [1, 64]
    assert loaded.sizes.ratio == pytest.approx(metrics["size_ratio_int8"])
    assert "<h1>kubetrain run report</h1>" in (root / "eval" / artifacts.EVAL_REPORT).read_text()


def test_evaluation_numbers_are_consistent(evaluated):
    _, m = evaluated
    assert m["accuracy_drop_int8"] == pytest.approx(
        m["test_accuracy_fp32"] - m["test_accuracy_int8"]
    )
    assert m["samples_per_second_b64_int8"] == pytest.approx(64e3 / m["latency_ms_b64_int8"])
    assert m["promoted"] is (min(m["test_accuracy_fp32"], m["test_accuracy_int8"]) >= 0.9)
    assert m["quantize_method"] == "weight_only_int8" or m["quantize_method"] == "none"


@pytest.mark.parametrize(
    ("kind", "marker"),
    [
        (TrainedModel, artifacts.MODEL_SPEC),
        (QuantizedModel, artifacts.QUANT_INFO),
        (SearchResult, artifacts.SEARCH_RESULT),
        (Evaluation, artifacts.EVAL_METRICS),
        (Promotion, artifacts.PROMOTION_RECORD),
        (Rejection, artifacts.REJECTION_RECORD),
    ],
    ids=["model", "quantized", "search", "evaluation", "promotion", "rejection"],
)
def test_an_artifact_is_complete_only_with_its_marker(tmp_path, kind, marker):
    assert not kind.is_complete(tmp_path)
    (tmp_path / marker).write_text("{}")
    assert kind.is_complete(tmp_path)


@pytest.mark.parametrize(
    ("load", "error"),
    [
        (DatasetArtifact.load, DataError),
        (TrainedModel.load, KubetrainError),
        (QuantizedModel.load, KubetrainError),
        (SearchResult.load, KubetrainError),
        (Evaluation.load, KubetrainError),
    ],
    ids=["dataset", "model", "quantized", "search", "evaluation"],
)
def test_loading_an_incomplete_artifact_names_the_directory(tmp_path, load, error):
    with pytest.raises(error, match=str(tmp_path)):
        load(tmp_path)


def test_search_result_and_promotion_round_trip(tmp_path):
    search = SearchResult(
        SearchSummary(enabled=True, best_params={"train.lr": 0.01}, trials_total=1),
        [Trial(number=0, state="complete", params={"train.lr": 0.01})],
    )
    search.save(tmp_path / "s", report_html="<p>search</p>")
    assert SearchResult.load(tmp_path / "s") == search
    assert SearchResult.load(None) == SearchResult.disabled()
    promotion = Promotion("v1", 0.95, 0.94, 0.9, fingerprint="abc")
    promotion.save(tmp_path)
    assert Promotion.load(tmp_path) == promotion
    assert "model_uri" not in promotion.to_record()


def test_dataset_round_trips(digits_dir, tmp_path):
    data = DatasetArtifact.load(digits_dir)
    data.save(tmp_path)
    again = DatasetArtifact.load(tmp_path)
    assert again.meta == data.meta and again.version == data.version
    assert all((again.arrays[k] == v).all() for k, v in data.arrays.items())
