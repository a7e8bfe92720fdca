"""fp32 vs int8 on the test split: the task's metrics, latency and size, into an
``Evaluation``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from kubetrain.core.artifacts import (
    MODEL_WEIGHTS,
    DatasetArtifact,
    Evaluation,
    Latency,
    QuantizedModel,
    Scores,
    SearchResult,
    Sizes,
    TrainedModel,
    TrainEfficiency,
)
from kubetrain.core.errors import KubetrainError
from kubetrain.evaluate.config import WARMUP_CALLS, EvaluateConfig
from kubetrain.tasks import measure
from kubetrain.tasks.base import Task


def warm_up(model: nn.Module, task: Task, batch: int) -> None:
    """Run ``model`` ``WARMUP_CALLS`` times on a test batch of ``batch`` before it is measured,
    as the latency rows do: its first calls pay for one-off work (a compiled int8 model
    compiles there, kernels are picked) that would otherwise count as scoring time, making the
    scoring throughput of one model contradict the latency rows."""
    import torch

    x, y = task.examples("test", batch)
    inputs = measure.latency_inputs(x, y, task.data.kind)
    with torch.no_grad():  # not inference_mode: inductor freezing fails under it
        for _ in range(WARMUP_CALLS):
            model(*inputs)


def score(
    model: nn.Module, task: Task, metric: str | None = None, warm_batch: int | None = None
) -> Scores:
    """The task's scores of ``model`` on the test split, with ``metric`` as the primary
    metric (default: the task's); its scoring throughput is that of one pass over the split,
    after ``warm_up`` on a batch of ``warm_batch`` (None: no warm-up).

    Raises:
        KubetrainError: the task's results have no ``metric``.
    """
    if warm_batch:
        warm_up(model, task, warm_batch)
    scores = task.score(model, "test")
    metric = metric or scores.metric
    if not isinstance(scores.values.get(metric), (int, float)):
        raise KubetrainError(
            f"evaluate: the {task.kind} task reports no {metric!r} (it has: "
            f"{', '.join(sorted(scores.values))})"
        )
    return replace(scores, metric=metric)


def latencies(fp32: nn.Module, int8: nn.Module, task: Task, cfg: EvaluateConfig) -> list[Latency]:
    """Median latency of both models at each of ``cfg.latency_batch_sizes``, timed in turns so
    that load from other processes hits both alike; inputs from ``task.examples`` (token
    ids for text: their count per batch is kept for tokens/s)."""
    x, y = task.examples("test", max(cfg.latency_batch_sizes))
    inputs = measure.latency_inputs(x, y, task.data.kind)
    out = []
    for batch in cfg.latency_batch_sizes:
        lat = measure.compare_latency(
            {"fp32": fp32, "int8": int8}, inputs, None, batch, cfg.latency_repeats
        )
        out.append(
            Latency(batch, lat["fp32"]["median"], lat["int8"]["median"], int(lat["fp32"]["tokens"]))
        )
    return out


def sizes(quantized: QuantizedModel, model_dir: Path) -> Sizes:
    """Weight and file bytes of both models, as the quantize step measured them."""
    info = quantized.info
    return Sizes(
        weights_fp32=info.fp32_size_bytes or 0,
        weights_int8=info.size_bytes or 0,
        file_fp32=info.fp32_file_bytes or 0,
        file_int8=info.file_bytes or 0,
        state_dict_fp32=(model_dir / MODEL_WEIGHTS).stat().st_size,
    )


def evaluate(
    cfg: EvaluateConfig,
    data: DatasetArtifact,
    model_dir: Path,
    quantized_dir: Path,
    search: SearchResult,
    min_value: float | None = None,
    task: Task | None = None,
) -> Evaluation:
    """Evaluate the fp32 model in ``model_dir`` against its int8 twin in ``quantized_dir``.

    Args:
        cfg: the primary metric, how latency is measured (batch sizes, repeats), decoding.
        data: the dataset artifact; its test split is used.
        model_dir: the train step's model artifact.
        quantized_dir: the quantize step's artifact.
        search: the tune step's result (reported, not used).
        min_value: the promotion bar on the primary metric (default: ``cfg.bar(data.kind)``).
        task: the task to score with (default: the model's, ``task_for_model``).

    Returns:
        The evaluation (``to_metrics()`` is metrics.json).

    Raises:
        KubetrainError: an input directory is not a complete artifact, or the task does
            not report the primary metric.
        ConfigError: ``cfg.metric`` does not apply to the dataset's kind.
    """
    import torch

    from kubetrain.quantize.driver import load_model, load_quantized
    from kubetrain.tasks import task_for_model

    metric = cfg.primary_metric(data.kind)
    trained = TrainedModel.load(model_dir)
    quantized = QuantizedModel.load(quantized_dir)
    # The evaluate section (metric, beam size, decode length) is this step's, not training's.
    task = (task or task_for_model(data.path, model_dir)).measure_as(cfg)
    fp32 = load_model(model_dir, task)
    int8 = load_quantized(quantized_dir, model_dir, task)
    return Evaluation(
        fp32=score(fp32, task, metric, max(cfg.latency_batch_sizes)),
        int8=score(int8, task, metric, max(cfg.latency_batch_sizes)),
        latency=latencies(fp32, int8, task, cfg),
        latency_threads=torch.get_num_threads(),
        sizes=sizes(quantized, Path(model_dir)),
        train=TrainEfficiency.from_summary(trained.summary),
        quantization=quantized.info,
        search=search,
        history=trained.history,
        classes=data.meta.classes,
        dataset_version=data.version,
        test_samples=data.meta.num_samples("test"),
        min_value=cfg.bar(data.kind) if min_value is None else min_value,
        kind=data.kind,
        beat_copy_baseline=cfg.beat_copy_baseline,
    )
