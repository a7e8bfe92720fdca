"""Logging a pipeline run to MLflow (see ``kubetrain.tracking``).

From the artifacts of the evaluate, train and quantize steps: ``collect`` reads them into a
``TrackedRun``, ``log_run`` sends it; ``track_pipeline_run`` is the ``track`` task's call.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetrain.core.artifacts import EVAL_DETAILS, EVAL_METRICS, EVAL_REPORT
from kubetrain.core.errors import KubetrainError
from kubetrain.tracking.config import TrackingConfig

log = logging.getLogger(__name__)

# Per-epoch fields of the training history logged as metrics with step = epoch.
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "lr", "samples_per_second",
                 "data_wait_share", "epoch_seconds")  # fmt: skip
TRIAL_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "fail": "FAILED"}


@dataclass
class TrackedRun:
    """What one pipeline run logs, read from its artifacts (``collect``)."""

    name: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    trials: list[dict[str, Any]]
    objective: str
    promoted: bool
    artifacts: dict[str, Path] = field(default_factory=dict)  # artifact path -> file or dir


@dataclass
class Tracked:
    """Where it went: the MLflow run, its URL, and the model version (if promoted)."""

    run_id: str
    url: str
    model_version: str | None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise KubetrainError(f"tracking: cannot read {path}: {err}") from None


def collect(
    name: str,
    config: dict[str, Any],
    evaluation_dir: Path,
    model_dir: Path,
    quantized_dir: Path,
    promoted: bool,
) -> TrackedRun:
    """A run's record from the evaluate step's directory (metrics.json, details.json with the
    history and trials, report.html) and the model artifacts.

    Raises:
        KubetrainError: a file the evaluate step writes is missing or unreadable.
    """
    metrics = _read_json(evaluation_dir / EVAL_METRICS)
    details = _read_json(evaluation_dir / EVAL_DETAILS)
    tuning = details.get("tuning") or {}
    return TrackedRun(
        name=name,
        config=config,
        metrics={**metrics, "promoted": promoted},
        history=details.get("history") or [],
        trials=details.get("trials") or [],
        objective=tuning.get("metric") or "val_accuracy",
        promoted=promoted,
        artifacts={
            EVAL_REPORT: evaluation_dir / EVAL_REPORT,
            EVAL_METRICS: evaluation_dir / EVAL_METRICS,
            "model/fp32": model_dir,
            "model/int8": quantized_dir,
        },
    )


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]  # MLflow's limit on a param value


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and value == value:  # bools too (0/1); not NaN
            out[key] = float(value)
    return out


def _client(uri: str):
    # Before mlflow is imported: no telemetry (nothing but the tracking server may be reached),
    # no "View run" lines on stdout, and a dead server costs seconds, not minutes of retries.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise KubetrainError(
            "tracking.mlflow_uri is set but mlflow is not installed: "
            "pip install 'kubetrain[tracking]'"
        ) from None
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def log_run(cfg: TrackingConfig, run: TrackedRun) -> Tracked:
    """Log ``run`` to the MLflow server of ``cfg`` (see the module docstring for what).

    Returns:
        The MLflow run id, its URL and the registered model version (None unless promoted).

    Raises:
        KubetrainError: the server cannot be reached or refuses a call (one line).
    """
    client = _client(cfg.mlflow_uri)
    try:
        return _log(client, cfg, run)
    except KubetrainError:
        raise
    except Exception as err:  # MlflowException, requests' errors: all one line for the user
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        # requests' retry errors quote the URL three times: the reason is what the user needs.
        for reason in ("Connection refused", "Name or service not known", "timed out"):
            if reason in message:
                message = reason.lower()
                break
        raise KubetrainError(
            f"tracking: cannot log to MLflow at {cfg.mlflow_uri}: {message}"
        ) from None


def _log(client, cfg: TrackingConfig, run: TrackedRun) -> Tracked:
    from mlflow.entities import Metric, Param

    exp = client.get_experiment_by_name(cfg.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
    m = run.metrics
    tags = {"kubetrain.promoted": str(run.promoted).lower()}
    if m.get("dataset_version"):
        tags["kubetrain.dataset_version"] = str(m["dataset_version"])
    parent = client.create_run(exp_id, run_name=run.name, tags=tags)
    rid = parent.info.run_id
    now = int(time.time() * 1000)
    params = [Param(k, _param(v)) for k, v in sorted(_flatten(run.config).items())]
    metrics = [Metric(k, v, now, 0) for k, v in _numbers(m).items()]
    for record in run.history:
        step = int(record["epoch"])
        values = {k: record.get(k) for k in EPOCH_METRICS}
        # The loss's named parts (a detector's classifier, box, objectness ... losses).
        values.update({f"train_{k}": v for k, v in (record.get("loss_components") or {}).items()})
        for key, value in _numbers(values).items():
            metrics.append(Metric(key, value, now, step))
    # log_batch takes at most 1000 metrics and 100 params per call
    for i in range(0, len(params), 100):
        client.log_batch(rid, params=params[i : i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[i : i + 1000])
    for trial in run.trials:
        _log_trial(client, exp_id, rid, trial, run.objective, now)
    for path, local in run.artifacts.items():
        if local.is_dir():
            client.log_artifacts(rid, str(local), path)
        elif local.is_file():
            parent_dir = str(Path(path).parent) if "/" in path else None
            client.log_artifact(rid, str(local), parent_dir)
    version = _register(client, cfg, rid, m) if run.promoted else None
    client.set_terminated(rid, "FINISHED")
    base = cfg.mlflow_uri.rstrip("/")
    url = f"{base}/#/experiments/{exp_id}/runs/{rid}" if base.startswith("http") else rid
    log.info("tracked in MLflow: %s%s", url, f" (model version {version})" if version else "")
    return Tracked(rid, url, version)


def _log_trial(client, exp_id: str, parent_id: str, trial: dict, objective: str, now: int):
    from mlflow.entities import Metric, Param

    tags = {"mlflow.parentRunId": parent_id, "kubetrain.trial_state": str(trial.get("state"))}
    if trial.get("error"):
        tags["kubetrain.trial_error"] = str(trial["error"])[:5000]
    child = client.create_run(exp_id, run_name=f"trial {trial.get('number')}", tags=tags)
    cid = child.info.run_id
    params = [Param(k, _param(v)) for k, v in (trial.get("params") or {}).items()]
    metrics = [Metric(objective, float(v), now, i + 1)
               for i, v in enumerate(trial.get("curve") or []) if v is not None]  # fmt: skip
    if trial.get("value") is not None:
        metrics.append(Metric(f"final_{objective}", float(trial["value"]), now, 0))
    if trial.get("seconds") is not None:
        metrics.append(Metric("seconds", float(trial["seconds"]), now, 0))
    client.log_batch(cid, metrics=metrics, params=params)
    client.set_terminated(cid, TRIAL_STATUS.get(str(trial.get("state")), "FINISHED"))


def _register(client, cfg: TrackingConfig, run_id: str, metrics: dict[str, Any]) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            cfg.registered_model, description="Promoted kubetrain models (fp32/ and int8/)."
        )
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {k: str(metrics[k]) for k in ("test_accuracy_fp32", "test_accuracy_int8",
            "dataset_version", "min_accuracy") if metrics.get(k) is not None}  # fmt: skip
    version = client.create_model_version(
        cfg.registered_model, source=f"runs:/{run_id}/model", run_id=run_id, tags=tags
    )
    return str(version.version)


def track_pipeline_run(
    config_json: str,
    evaluation_dir: str | Path,
    model_dir: str | Path,
    quantized_dir: str | Path,
    promoted: bool,
    run_name: str,
) -> Tracked:
    """The ``track`` task: log one pipeline run from its artifacts (see ``log_run``).

    Args:
        config_json: the effective config (every section, run-time overrides applied).
        evaluation_dir, model_dir, quantized_dir: the evaluate, train and quantize outputs.
        promoted: the accuracy gate's decision.
        run_name: the MLflow run name (the pipeline job's name).

    Raises:
        KubetrainError: unreadable artifacts, or MLflow unreachable (one line).
    """
    config = json.loads(config_json)
    # Where it is logged, not what was trained: the section is not logged as a parameter.
    tracking = TrackingConfig.validated(config.pop("tracking", None))
    run = collect(run_name, config, Path(evaluation_dir), Path(model_dir), Path(quantized_dir),
                  promoted)  # fmt: skip
    return log_run(tracking, run)
