"""The pipeline's steps as plain functions on directories: what the CLI and the KFP components call.

Each step reads artifacts from disk, writes its own artifact directory, and returns a small dict
for logging. Heavy imports (torch, optuna, torchao) happen inside, so importing this is cheap.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from kubetrain.core import artifacts
from kubetrain.core.io import read_json
from kubetrain.core.records import (
    DatasetMeta,
    DatasetPart,
    PreprocessPlan,
    QuantInfo,
    SearchSummary,
    TrainSummary,
)
from kubetrain.pipeline.config import PipelineConfig

log = logging.getLogger(__name__)


# Settings only image data uses: on other data they would be silently ignored.
_IMAGES_ONLY = {
    "data.mixup_alpha": lambda c: c.data.mixup_alpha,
    "data.cutmix_alpha": lambda c: c.data.cutmix_alpha,
    "data.transforms": lambda c: any(c.data.transforms.model_dump().values()),
}


def check_supported(cfg: PipelineConfig, model: bool = True) -> None:
    """Refuse, before any step runs, what the steps cannot do or would silently ignore: a model
    that does not take the task's data (unless ``model`` is False: the preprocess step gets
    the data section alone), a setting only image data uses.

    Raises:
        ConfigError: naming the setting.
    """
    from kubetrain.core.errors import ConfigError
    from kubetrain.models.text import check_model_for_task

    if model:
        check_model_for_task(cfg)
    image_only = [key for key, is_set in _IMAGES_ONLY.items() if is_set(cfg)]
    if image_only:
        from kubetrain.tasks import kind_of

        kind = kind_of(cfg.data)
        # Detection takes the transforms (they move its boxes), not MixUp/CutMix.
        if kind != "images" and not (kind == "detection" and image_only == ["data.transforms"]):
            raise ConfigError(
                f"config error: {image_only[0]}: applies to image data only; data.source "
                f"{cfg.data.source!r} is {kind} data"
            )


def check_model_on_data(cfg: PipelineConfig, dataset_dir: Path) -> None:
    """On the local backend, build the model once here and run it on two examples of the
    dataset (``kubetrain.tasks.check_model``), so that a model that cannot be built or does not
    fit the data is this step's one line (exit 2) rather than a failure in every worker. On a
    cluster the job's workers build it (the pod that launches the job has no room for it).

    Raises:
        ConfigError: naming model.name.
    """
    if cfg.cluster.backend != "local":
        return
    from kubetrain.data import load_dataset
    from kubetrain.tasks import check_model

    check_model(cfg, load_dataset(dataset_dir))


def preprocess(cfg: PipelineConfig, out_dir: Path) -> DatasetMeta:
    """Source -> versioned dataset artifact (``kubetrain.core.artifacts.DatasetArtifact``)."""
    check_supported(cfg, model=False)
    from kubetrain.tasks import build_dataset

    meta = build_dataset(cfg.data, out_dir)
    log.info("dataset %s: %s samples from %s", meta.version, meta.sizes, meta.source)
    return meta


def preprocess_plan(cfg: PipelineConfig, out_dir: Path) -> PreprocessPlan:
    """Preprocess fanned out, first task: the plan (``kubetrain.tasks.plan_dataset``) for
    ``data.parallel_tasks`` convert tasks."""
    check_supported(cfg, model=False)
    from kubetrain.data.fanout import range_label
    from kubetrain.tasks import plan_dataset

    plan = plan_dataset(cfg.data, out_dir, cfg.data.parallel_tasks)
    if plan.whole:
        log.info("plan: %s data is built whole by the merge task", plan.kind)
    else:
        samples = sum(s.samples for s in plan.slots)
        log.info("plan %s: %d shards, %d samples from %s", plan.fingerprint, len(plan.slots),
                 samples, plan.source)  # fmt: skip
        for task in range(plan.num_tasks):
            log.info("plan: %s", range_label(plan, task))
    return plan


def preprocess_convert(plan_dir: Path, task: int, out_dir: Path) -> DatasetPart:
    """Preprocess fanned out, convert task ``task`` (0-based): its range of the plan's shards,
    with the data section the plan was made with."""
    from kubetrain.core.artifacts import PlanArtifact
    from kubetrain.data.fanout import range_label
    from kubetrain.tasks import convert_range

    label = range_label(PlanArtifact.load(plan_dir).plan, task)
    part = convert_range(plan_dir, task, out_dir)
    samples = sum(r.samples for r in part.slots)
    log.info("converted %s: %d shards, %d samples in %.1f s", label, len(part.slots), samples,
             part.seconds)  # fmt: skip
    return part


def preprocess_merge(plan_dir: Path, part_dirs: list[Path], out_dir: Path) -> DatasetMeta:
    """Preprocess fanned out, last task: every range checked, the dataset artifact written."""
    from kubetrain.tasks import merge_dataset

    meta = merge_dataset(plan_dir, list(part_dirs), out_dir)
    log.info("dataset %s: %s samples from %s", meta.version, meta.sizes, meta.source)
    return meta


def tune(cfg: PipelineConfig, dataset_dir: Path, out_dir: Path) -> SearchSummary:
    """Search -> the search artifact (``kubetrain.core.artifacts.SearchResult``).

    Optuna in local processes, or a Katib Experiment on ``cluster.backend: kubernetes``.
    """
    if not cfg.tune.enabled:
        disabled = artifacts.SearchResult.disabled()
        disabled.save(out_dir)
        return disabled.summary
    from kubetrain.tune.backend import get_tune_backend

    check_supported(cfg)
    check_model_on_data(cfg, dataset_dir)
    result = get_tune_backend(cfg).run(cfg, dataset_dir, out_dir)
    log.info("best %s %.4f with %s", result.metric, result.best_value, result.best_params)
    return result


def tuned_config(cfg: PipelineConfig, params_file: Path | None) -> PipelineConfig:
    """``cfg`` with the best parameters of a tune artifact applied (if one is given)."""
    if params_file is None:
        return cfg
    best = SearchSummary.read(params_file).best_params
    if best:
        log.info("training with tuned parameters %s", best)
    return cfg.with_params(best)


def train(
    cfg: PipelineConfig, dataset_dir: Path, out_dir: Path, params_file: Path | None = None
) -> TrainSummary:
    """Dataset (+ tuned params) -> model artifact, through the configured launcher."""
    check_supported(cfg)
    from kubetrain.launch import get_launcher

    cfg = tuned_config(cfg, params_file)
    check_model_on_data(cfg, dataset_dir)
    get_launcher(cfg).run(cfg, dataset_dir, out_dir)
    return artifacts.TrainedModel.load_summary(out_dir)


def quantize(cfg: PipelineConfig, dataset_dir: Path, model_dir: Path, out_dir: Path) -> QuantInfo:
    """fp32 model artifact -> int8 artifact (``quantize.*``): calibration and QAT use the
    training split, the accuracy gate the validation split, measured as the evaluate step will
    (``evaluate.metric``, beam size, decode length); raises KubetrainError if it fails."""
    from kubetrain.quantize.driver import quantize_artifact

    info = quantize_artifact(model_dir, dataset_dir, out_dir, cfg.quantize, scoring=cfg.evaluate)
    log.info("%s: %d -> %d bytes", info.name, info.fp32_size_bytes, info.size_bytes)
    return info


def promotion_bar(cfg: PipelineConfig) -> float:
    """The promotion bar on the primary metric that ``cfg`` sets: ``evaluate.min_value``, else
    ``evaluate.min_accuracy`` for classification and 0 for seq2seq (the ``min_accuracy``
    pipeline parameter's default: it carries the bar of whichever metric is primary).

    Taken from the declared kind (``data.kind``, or ``data.task``), never from the data:
    compiling a pipeline calls it. Tabular and images have the same bar, so ``auto`` needs no
    look at the source."""
    from kubetrain.tasks import declared_kind

    return cfg.evaluate.bar(declared_kind(cfg.data) or "classification")


def is_promotable(metrics: dict[str, Any], min_value: float) -> bool:
    """The promotion rule: both the fp32 and the int8 model reach ``min_value`` on the primary
    metric of the test split (accuracy, BLEU, ...; seq2seq also beats copying the source)."""
    return artifacts.is_promotable(metrics, min_value)


def evaluate(
    cfg: PipelineConfig,
    dataset_dir: Path,
    model_dir: Path,
    quantized_dir: Path,
    out_dir: Path,
    tune_dir: Path | None = None,
    min_value: float | None = None,
) -> dict[str, Any]:
    """The task's metrics and efficiency of fp32 vs int8 -> the evaluation artifact
    (``metrics.json``, ``details.json``, ``report.html``); returns metrics.json's content.

    ``min_value`` is the promotion bar on the primary metric (``evaluate.metric``; default
    ``evaluate.min_value``, else ``evaluate.min_accuracy`` for classification); ``tune_dir`` the
    search that chose the parameters, if there was one. Raises KubetrainError or DataError if
    an input is not a complete artifact, ConfigError if ``evaluate.metric`` does not fit the
    dataset.
    """
    check_supported(cfg)
    from kubetrain.data import load_dataset
    from kubetrain.evaluate import compare, report

    data = load_dataset(dataset_dir)
    evaluation = compare.evaluate(
        cfg.evaluate,
        data,
        Path(model_dir),
        Path(quantized_dir),
        artifacts.SearchResult.load(tune_dir),
        min_value,
    )
    # What preprocess dropped, skipped or clipped is said where the results are read.
    evaluation.save(out_dir, report.render(evaluation, data.meta.notes))
    metrics = evaluation.to_metrics()
    log.info(
        "test %s fp32 %.4f int8 %.4f; size %d -> %d bytes; promotable %s (%s)",
        evaluation.metric, evaluation.fp32.value, evaluation.int8.value,
        evaluation.sizes.weights_fp32, evaluation.sizes.weights_int8, metrics["promoted"],
        artifacts.gate_reason(metrics, evaluation.min_value),
    )  # fmt: skip
    return metrics


def needs_training(cfg: PipelineConfig, dataset_dir: Path) -> bool:
    """``retrain.only_if_changed``: False if data and config match the last promoted model."""
    from kubetrain.registry import needs_training as check

    version = artifacts.DatasetArtifact.read_meta(dataset_dir).version
    train, why = check(cfg.retrain, cfg.model_inputs_json(), version)
    log.info("%s: %s", "training" if train else "skipping training", why)
    return train


def promote(
    model_dir: Path,
    quantized_dir: Path,
    metrics_file: Path,
    out_dir: Path,
    cfg: PipelineConfig | None = None,
) -> dict:
    """Copy the fp32 and int8 artifacts and their metrics into the promoted-model artifact.

    With ``retrain.registry`` set in ``cfg``, also publish them there (``kubetrain.registry``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for src, name in (
        (model_dir, artifacts.PROMOTED_FP32),
        (quantized_dir, artifacts.PROMOTED_INT8),
    ):
        shutil.copytree(src, out_dir / name, dirs_exist_ok=True)
    promotion = artifacts.Promotion.from_metrics(read_json(metrics_file))
    if cfg is not None and cfg.retrain.registry:
        from kubetrain.registry import publish

        promotion = publish(cfg.retrain.registry, out_dir, promotion, cfg.model_inputs_json())
    promotion.save(out_dir)
    return promotion.to_record()
