"""The pipeline's steps as plain functions on directories: what the CLI and the KFP components call.

Each step reads artifacts from disk, writes its own artifact directory, and returns a small dict
for logging. Heavy imports (torch, optuna, torchao) happen inside, so importing this is cheap.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from kubetrain import artifacts
from kubetrain.config import PipelineConfig
from kubetrain.io import read_json

log = logging.getLogger(__name__)


# Settings of the vision and language modules that the steps do not use yet: set away from their
# defaults they would be silently ignored, so they are refused instead (README: "Vision (in
# progress)", "Language (in progress)").
_NOT_IN_THE_STEPS_YET = {
    "data.mixup_alpha": lambda c: c.data.mixup_alpha,
    "data.cutmix_alpha": lambda c: c.data.cutmix_alpha,
    "data.transforms": lambda c: any(c.data.transforms.model_dump().values()),
}


def check_supported(cfg: PipelineConfig) -> None:
    """Refuse what the steps would silently ignore: a setting of the vision modules that the
    steps do not use yet.

    Raises:
        ConfigError: naming the setting.
    """
    from kubetrain.errors import ConfigError
    from kubetrain.models.text import check_model_for_task

    check_model_for_task(cfg)
    for key, is_set in _NOT_IN_THE_STEPS_YET.items():
        if is_set(cfg):
            raise ConfigError(
                f"config error: {key}: not used by the pipeline steps yet (the vision and "
                "language modules have it; the steps do not); leave it at its default"
            )


def preprocess(cfg: PipelineConfig, out_dir: Path) -> dict[str, Any]:
    """Source -> versioned dataset artifact (``kubetrain.artifacts.DatasetArtifact``)."""
    check_supported(cfg)
    from kubetrain.workloads import build_dataset

    meta = build_dataset(cfg.data, out_dir)
    log.info("dataset %s: %s samples from %s", meta["version"], meta["sizes"], meta["source"])
    return meta


def tune(cfg: PipelineConfig, dataset_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Search -> the search artifact (``kubetrain.artifacts.SearchResult``).

    Optuna in local processes, or a Katib Experiment on ``cluster.backend: kubernetes``.
    """
    if not cfg.tune.enabled:
        disabled = artifacts.SearchResult.disabled()
        disabled.save(out_dir)
        return disabled.summary
    from kubetrain.tune.backend import get_tune_backend

    result = get_tune_backend(cfg).run(cfg, dataset_dir, out_dir)
    log.info("best %s %.4f with %s", result["metric"], result["best_value"], result["best_params"])
    return result


def tuned_config(cfg: PipelineConfig, params_file: Path | None) -> PipelineConfig:
    """``cfg`` with the best parameters of a tune artifact applied (if one is given)."""
    if params_file is None:
        return cfg
    best = read_json(params_file).get("best_params") or {}
    if best:
        log.info("training with tuned parameters %s", best)
    return cfg.with_params(best)


def train(
    cfg: PipelineConfig, dataset_dir: Path, out_dir: Path, params_file: Path | None = None
) -> dict[str, Any]:
    """Dataset (+ tuned params) -> model artifact, through the configured launcher."""
    check_supported(cfg)
    from kubetrain.launch import get_launcher

    cfg = tuned_config(cfg, params_file)
    get_launcher(cfg).run(cfg, dataset_dir, out_dir)
    return artifacts.TrainedModel.load_summary(out_dir)


def quantize(cfg: PipelineConfig, dataset_dir: Path, model_dir: Path, out_dir: Path) -> dict:
    """fp32 model artifact -> int8 artifact (``quantize.*``): calibration and QAT use the
    training split, the accuracy gate the validation split; raises KubetrainError if it fails."""
    from kubetrain.quantize.driver import quantize_artifact

    info = quantize_artifact(model_dir, dataset_dir, out_dir, cfg.quantize)
    log.info("%s: %d -> %d bytes", info["name"], info["fp32_size_bytes"], info["size_bytes"])
    return info


def is_promotable(metrics: dict[str, Any], min_accuracy: float) -> bool:
    """The promotion rule: both the fp32 and the int8 model reach ``min_accuracy`` on test."""
    return artifacts.is_promotable(metrics, min_accuracy)


def evaluate(
    cfg: PipelineConfig,
    dataset_dir: Path,
    model_dir: Path,
    quantized_dir: Path,
    out_dir: Path,
    tune_dir: Path | None = None,
    min_accuracy: float | None = None,
) -> dict[str, Any]:
    """Accuracy and efficiency of fp32 vs int8 -> the evaluation artifact (``metrics.json``,
    ``details.json``, ``report.html``); returns metrics.json's content.

    ``min_accuracy`` (default ``evaluate.min_accuracy``) is the promotion bar; ``tune_dir`` the
    search that chose the parameters, if there was one. Raises KubetrainError or DataError if
    an input is not a complete artifact.
    """
    check_supported(cfg)
    from kubetrain.data import load_dataset
    from kubetrain.evaluate import compare, report

    bar = cfg.evaluate.min_accuracy if min_accuracy is None else min_accuracy
    evaluation = compare.evaluate(
        cfg.evaluate,
        load_dataset(dataset_dir),
        Path(model_dir),
        Path(quantized_dir),
        artifacts.SearchResult.load(tune_dir),
        bar,
    )
    evaluation.save(out_dir, report.render(evaluation))
    log.info(
        "test accuracy fp32 %.4f int8 %.4f; size %d -> %d bytes; promotable %s",
        evaluation.fp32.accuracy, evaluation.int8.accuracy, evaluation.sizes.weights_fp32,
        evaluation.sizes.weights_int8, evaluation.promoted,
    )  # fmt: skip
    return evaluation.to_metrics()


def needs_training(cfg: PipelineConfig, dataset_dir: Path) -> bool:
    """``retrain.only_if_changed``: False if data and config match the last promoted model."""
    from kubetrain.registry import needs_training as check

    train, why = check(cfg, artifacts.DatasetArtifact.read_meta(dataset_dir)["version"])
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

        promotion = publish(cfg.retrain.registry, out_dir, promotion, cfg)
    promotion.save(out_dir)
    return promotion.to_record()
