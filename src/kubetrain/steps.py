"""The pipeline's steps as plain functions on directories: what the CLI and the KFP components call.

Each step reads artifacts from disk, writes its own artifact directory, and returns a small dict
for logging. Heavy imports (torch, optuna, torchao) happen inside, so importing this is cheap.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from kubetrain.config import PipelineConfig
from kubetrain.io import read_json, write_json

log = logging.getLogger(__name__)


def preprocess(cfg: PipelineConfig, out_dir: Path) -> dict[str, Any]:
    """Source -> versioned dataset artifact (``data.npz`` + ``meta.json``)."""
    from kubetrain.data import build_dataset

    meta = build_dataset(cfg.data, out_dir).meta
    log.info("dataset %s: %s samples from %s", meta["version"], meta["sizes"], meta["source"])
    return meta


def tune(cfg: PipelineConfig, dataset_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Search -> ``best_params.json`` (dotted config keys) and ``trials.json``.

    Optuna on this machine, or a Katib Experiment on ``cluster.backend: kubernetes``.
    """
    from kubetrain.tune import local

    if not cfg.tune.enabled:
        return local.disabled_result(out_dir)
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
    from kubetrain.launch import get_launcher

    cfg = tuned_config(cfg, params_file)
    get_launcher(cfg).run(cfg, dataset_dir, out_dir)
    return read_json(out_dir / "metrics.json")


def quantize(cfg: PipelineConfig, dataset_dir: Path, model_dir: Path, out_dir: Path) -> dict:
    """fp32 model artifact -> int8 artifact (``quantize.*``): calibration and QAT use the
    training split, the accuracy gate the validation split; raises KubetrainError if it fails."""
    from kubetrain.quantize import quantize_artifact

    info = quantize_artifact(model_dir, dataset_dir, out_dir, cfg.quantize)
    log.info("%s: %d -> %d bytes", info["name"], info["fp32_size_bytes"], info["size_bytes"])
    return info


def is_promotable(metrics: dict[str, Any], min_accuracy: float) -> bool:
    """The promotion rule: both the fp32 and the int8 model reach ``min_accuracy`` on test."""
    return min(metrics["test_accuracy_fp32"], metrics["test_accuracy_int8"]) >= min_accuracy


def evaluate(
    cfg: PipelineConfig,
    dataset_dir: Path,
    model_dir: Path,
    quantized_dir: Path,
    out_dir: Path,
    tune_dir: Path | None = None,
    min_accuracy: float | None = None,
) -> dict[str, Any]:
    """Accuracy and efficiency of fp32 vs int8 -> ``metrics.json``, ``details.json``, ``report.html``."""
    import torch

    from kubetrain.data import load_dataset
    from kubetrain.evaluate import measure, report
    from kubetrain.quantize import load_model, load_quantized

    bar = cfg.evaluate.min_accuracy if min_accuracy is None else min_accuracy
    data = load_dataset(dataset_dir)
    x_test, y_test = data.split("test")
    models = {"fp32": load_model(model_dir), "int8": load_quantized(quantized_dir)}
    train_metrics = read_json(model_dir / "metrics.json")
    quant = read_json(quantized_dir / "quant.json")
    threads = torch.get_num_threads()
    m: dict[str, Any] = {}
    per_model = {}
    for name, model in models.items():
        per_model[name] = measure.classification(
            y_test, measure.predict(model, x_test, data.input_shape), data.meta["classes"]
        )
        m[f"test_accuracy_{name}"] = per_model[name]["accuracy"]
    for batch in cfg.evaluate.latency_batch_sizes:
        # fp32 and int8 timed in turns, so load from other processes hits both alike.
        lat = measure.compare_latency(
            models, x_test, data.input_shape, batch, cfg.evaluate.latency_repeats
        )
        for name in models:
            m[f"latency_ms_b{batch}_{name}"] = lat[name]["median"]
    # Weight bytes of like artifacts (the fp32 model exported the same way as the int8 one),
    # and the whole files, which for a small model are mostly the serialized graph.
    m["model_size_bytes_fp32"] = quant["fp32_size_bytes"]
    m["model_size_bytes_int8"] = quant["size_bytes"]
    m["model_file_bytes_fp32"] = quant["fp32_file_bytes"]
    m["model_file_bytes_int8"] = quant["file_bytes"]
    m["model_state_dict_bytes_fp32"] = (model_dir / "model.pt").stat().st_size
    m["size_ratio_int8"] = m["model_size_bytes_int8"] / m["model_size_bytes_fp32"]
    m["accuracy_drop_int8"] = m["test_accuracy_fp32"] - m["test_accuracy_int8"]
    for batch in cfg.evaluate.latency_batch_sizes:
        m[f"latency_ratio_b{batch}_int8"] = (
            m[f"latency_ms_b{batch}_int8"] / m[f"latency_ms_b{batch}_fp32"]
        )
        m[f"samples_per_second_b{batch}_fp32"] = batch * 1e3 / m[f"latency_ms_b{batch}_fp32"]
        m[f"samples_per_second_b{batch}_int8"] = batch * 1e3 / m[f"latency_ms_b{batch}_int8"]
    # What the quantize step tried, measured on validation there (see its quant.json).
    for c in quant.get("candidates", []):
        key = c["name"].replace("/", "_")
        for field in ("val_accuracy", "size_bytes", "latency_ms_b1", "latency_ms_b64",
                      "samples_per_second_b64"):  # fmt: skip
            if c.get(field) is not None:
                m[f"quant_{key}_{field}"] = c[field]
    m.update(
        {
            "quantize_method": quant["method"],
            "quantize_candidate": quant["name"],
            "quantize_runtime": quant["runtime"],
            "quantize_decision": quant["decision"],
            "latency_threads": threads,
            "train_seconds": train_metrics["train_seconds"],
            "train_step_seconds": train_metrics["step_seconds"],
            "train_samples_per_second": train_metrics["samples_per_second"],
            "train_data_wait_share": train_metrics["data_wait_share"],
            "train_world_size": train_metrics["world_size"],
            "train_ranks_identical": train_metrics["ranks_identical"],
            "train_epochs": train_metrics["epochs"],
            # Efficiency of the training step (absent from models trained by older versions).
            **{
                f"train_{key}": train_metrics.get(key)
                for key in (
                    "precision",
                    "mfu",
                    "flops_per_sample",
                    "compute_share",
                    "optimizer_share",
                    "comm_seconds",
                    "allreduce_calls",
                    "cpu_percent",
                    "peak_rss_mib",
                    "rank_cpu_percent",
                    "rank_peak_rss_mib",
                    "gpu_peak_mib",
                    "checkpoint_seconds",
                    "checkpoints_written",
                    "compile_seconds",
                    "resumed_from_step",
                    "restarts",
                )
            },
            "dataset_version": data.meta["version"],
            "test_samples": len(y_test),
            "min_accuracy": bar,
        }
    )
    tuning = read_json(tune_dir / "best_params.json") if tune_dir else {"enabled": False}
    if tuning.get("enabled"):
        m["tune_trials"] = tuning["trials_total"]
        m["tune_best_value"] = tuning["best_value"]
    m["promoted"] = is_promotable(m, bar)
    details = {
        "classes": data.meta["classes"],
        "per_class_accuracy": per_model["fp32"]["per_class_accuracy"],
        "confusion_matrix": per_model["fp32"]["confusion_matrix"],
        "per_class_accuracy_int8": per_model["int8"]["per_class_accuracy"],
        "confusion_matrix_int8": per_model["int8"]["confusion_matrix"],
        "history": read_json(model_dir / "history.json"),
        "tuning": tuning,
        "quantization": quant,
        "trials": read_json(tune_dir / "trials.json") if tune_dir else [],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "details.json", details)
    (out_dir / "report.html").write_text(report.render(m, details))
    write_json(out_dir / "metrics.json", m)
    log.info(
        "test accuracy fp32 %.4f int8 %.4f; size %d -> %d bytes; promotable %s",
        m["test_accuracy_fp32"], m["test_accuracy_int8"], m["model_size_bytes_fp32"],
        m["model_size_bytes_int8"], m["promoted"],
    )  # fmt: skip
    return m


def needs_training(cfg: PipelineConfig, dataset_dir: Path) -> bool:
    """``retrain.only_if_changed``: False if data and config match the last promoted model."""
    from kubetrain.registry import needs_training as check

    train, why = check(cfg, read_json(dataset_dir / "meta.json")["version"])
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
    for src, name in ((model_dir, "fp32"), (quantized_dir, "int8")):
        shutil.copytree(src, out_dir / name, dirs_exist_ok=True)
    metrics = read_json(metrics_file)
    record = {
        "promoted": True,
        "dataset_version": metrics["dataset_version"],
        "test_accuracy_fp32": metrics["test_accuracy_fp32"],
        "test_accuracy_int8": metrics["test_accuracy_int8"],
        "min_accuracy": metrics["min_accuracy"],
    }
    if cfg is not None and cfg.retrain.registry:
        from kubetrain.registry import publish

        record = publish(cfg.retrain.registry, out_dir, record, cfg)
    write_json(out_dir / "promotion.json", record)
    return record
