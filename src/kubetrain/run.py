"""``kubetrain run``: the whole pipeline on this machine under KFP's local runner.

Every step runs as a KFP task (a subprocess of this interpreter, exactly the component code a
cluster runs); caching makes a re-run into the same directory skip finished steps.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from kubetrain.config import PipelineConfig
from kubetrain.errors import ConfigError, KubetrainError
from kubetrain.io import read_json, write_json

log = logging.getLogger(__name__)

MARKER = ".kubetrain-run"


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    report: Path
    promoted_model: Path | None
    seconds: float
    retrained: bool = True  # False: retrain.only_if_changed found nothing new
    reason: str = ""


def preflight(cfg: PipelineConfig) -> None:
    """Check what can be checked before anything is written: data readable, model fits it."""
    from kubetrain.data.sources import load_source

    if cfg.cluster.backend != "local":
        raise KubetrainError(
            "cluster.backend 'kubernetes' is for cluster runs; `kubetrain run` runs locally "
            "(use cluster.backend=local)"
        )
    raw = load_source(cfg.data)
    if cfg.model.name == "cnn" and raw.image_shape is None:
        raise ConfigError(
            "config error: model.name: 'cnn' needs image data; set data.image_shape (C,H,W) "
            "for images stored as columns, or use 'mlp'"
        )


def prepare_run_dir(output: Path | None) -> Path:
    """The run directory: ``output`` or ``runs/<timestamp>``; never someone else's files."""
    run_dir = output or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / MARKER).exists():
        raise KubetrainError(
            f"{run_dir}: exists, is not empty and is not a kubetrain run directory; "
            "choose another --output"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).touch()
    return run_dir.resolve()


def run_local(cfg: PipelineConfig, output: Path | None = None, cache: bool = True) -> RunResult:
    """Run the pipeline under ``kfp.local.SubprocessRunner``; return metrics and paths."""
    from kfp import local

    from kubetrain.pipelines import build_pipeline

    preflight(cfg)
    pipeline = build_pipeline(cfg)
    run_dir = prepare_run_dir(output)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(run_dir / "kfp"),
        enable_caching=cache,
        cache_root=str(run_dir / "kfp" / ".cache"),
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        # kfp warns for every task whose base image name lacks "python"; ours is a Python image.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            task = pipeline(min_accuracy=cfg.evaluate.min_accuracy)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else "a task failed"
            raise KubetrainError(
                f"pipeline failed: {first} (the task's log above says why; outputs so far are "
                f"in {run_dir / 'kfp'})"
            ) from None
    seconds = time.perf_counter() - started
    if cfg.retrain.only_if_changed:
        # This pipeline's one output is the decision; the evaluation is found on disk.
        if not task.output:
            reason = "data and config unchanged since the last promoted model"
            return RunResult(run_dir, {}, None, None, seconds, retrained=False, reason=reason)
        found = _find_output(run_dir / "kfp", "evaluate", "evaluation")
        if found is None:
            raise KubetrainError(f"pipeline ran but wrote no evaluation under {run_dir / 'kfp'}")
        evaluation = found
        promoted = bool(read_json(evaluation / "metrics.json")["promoted"])
    else:
        evaluation = Path(task.outputs["evaluation"].path)
        promoted = bool(task.outputs["promoted"])
    metrics = read_json(evaluation / "metrics.json")
    metrics["promoted"] = promoted
    metrics["pipeline_seconds"] = seconds
    write_json(run_dir / "metrics.json", metrics)
    shutil.copyfile(evaluation / "report.html", run_dir / "report.html")
    promoted_dir = _find_output(run_dir / "kfp", "promote", "promoted") if promoted else None
    return RunResult(run_dir, metrics, run_dir / "report.html", promoted_dir, seconds)


def _find_output(pipeline_root: Path, task: str, output: str) -> Path | None:
    """The newest ``<pipeline_root>/<run>/<task>/<output>`` (kfp.local's layout)."""
    found = sorted(pipeline_root.glob(f"*/{task}/{output}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
