"""fp32 vs int8 on the test split: accuracy, latency and size, into an ``Evaluation``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from kubetrain.artifacts import (
    MODEL_WEIGHTS,
    DatasetArtifact,
    Evaluation,
    Latency,
    ModelScores,
    QuantizedModel,
    SearchResult,
    Sizes,
    TrainedModel,
    TrainEfficiency,
)
from kubetrain.evaluate import measure
from kubetrain.evaluate.config import EvaluateConfig
from kubetrain.workloads.base import Workload

_SCORE_FIELDS = ("accuracy", "per_class_accuracy", "confusion_matrix")


def score(model: nn.Module, workload: Workload) -> ModelScores:
    """The workload's scores of ``model`` on the test split: accuracy, per-class accuracy and
    confusion matrix, and the workload's other metrics and examples."""
    scores = workload.score(model, "test")
    values = scores.values
    return ModelScores(
        **{k: values.get(k) for k in _SCORE_FIELDS},
        extra={k: v for k, v in values.items() if k not in _SCORE_FIELDS},
        examples=scores.examples,
        samples_per_second=scores.samples / scores.seconds if scores.seconds else None,
    )


def latencies(
    fp32: nn.Module, int8: nn.Module, workload: Workload, cfg: EvaluateConfig
) -> list[Latency]:
    """Median latency of both models at each of ``cfg.latency_batch_sizes``, timed in turns so
    that load from other processes hits both alike."""
    x_test, _ = workload.examples("test", max(cfg.latency_batch_sizes))
    out = []
    for batch in cfg.latency_batch_sizes:
        lat = measure.compare_latency(
            {"fp32": fp32, "int8": int8}, x_test.numpy(), workload.data.input_shape, batch,
            cfg.latency_repeats,
        )  # fmt: skip
        out.append(Latency(batch, lat["fp32"]["median"], lat["int8"]["median"]))
    return out


def sizes(quantized: QuantizedModel, model_dir: Path) -> Sizes:
    """Weight and file bytes of both models, as the quantize step measured them."""
    info = quantized.info
    return Sizes(
        weights_fp32=info["fp32_size_bytes"],
        weights_int8=info["size_bytes"],
        file_fp32=info["fp32_file_bytes"],
        file_int8=info["file_bytes"],
        state_dict_fp32=(model_dir / MODEL_WEIGHTS).stat().st_size,
    )


def evaluate(
    cfg: EvaluateConfig,
    data: DatasetArtifact,
    model_dir: Path,
    quantized_dir: Path,
    search: SearchResult,
    min_accuracy: float,
) -> Evaluation:
    """Evaluate the fp32 model in ``model_dir`` against its int8 twin in ``quantized_dir``.

    Args:
        cfg: how latency is measured (batch sizes, repeats).
        data: the dataset artifact; its test split is used.
        model_dir: the train step's model artifact.
        quantized_dir: the quantize step's artifact.
        search: the tune step's result (reported, not used).
        min_accuracy: the promotion bar.

    Returns:
        The evaluation (``to_metrics()`` is metrics.json).

    Raises:
        KubetrainError: an input directory is not a complete artifact.
    """
    import torch

    from kubetrain.quantize.driver import load_model, load_quantized
    from kubetrain.workloads import workload_for_model

    trained = TrainedModel.load(model_dir)
    quantized = QuantizedModel.load(quantized_dir)
    fp32, int8 = load_model(model_dir), load_quantized(quantized_dir)
    workload = workload_for_model(data.path, model_dir)
    return Evaluation(
        fp32=score(fp32, workload),
        int8=score(int8, workload),
        latency=latencies(fp32, int8, workload, cfg),
        latency_threads=torch.get_num_threads(),
        sizes=sizes(quantized, Path(model_dir)),
        train=TrainEfficiency.from_summary(trained.summary),
        quantization=quantized.info,
        search=search,
        history=trained.history,
        classes=data.classes,
        dataset_version=data.version,
        test_samples=data.meta["sizes"]["test"],
        min_accuracy=min_accuracy,
    )
