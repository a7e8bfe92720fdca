"""Every object a cluster run creates, exactly as the launchers send them (``kubetrain manifests``).

The tune step creates a Katib Experiment (if ``tune.enabled``), the train step a PyTorchJob;
both through the same builders used here, under fresh names. The train job is shown with the
config as given: in a run it trains with the tuned parameters applied.
"""

from __future__ import annotations

from typing import Any

import yaml

from kubetrain.pipeline.config import PipelineConfig


def cluster_manifests(
    cfg: PipelineConfig, train_name: str | None = None, tune_name: str | None = None
) -> list[dict[str, Any]]:
    """[Experiment (if tuning), PyTorchJob] for ``cfg``; raises KubetrainError without an image."""
    from kubetrain.launch.cluster import new_name
    from kubetrain.launch.kubernetes import build_train_job
    from kubetrain.tune.katib import build_experiment

    docs = []
    if cfg.tune.enabled:
        docs.append(build_experiment(cfg, tune_name or new_name(cfg, "tune")))
    docs.append(build_train_job(cfg, train_name or new_name(cfg, "train")))
    return docs


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML (``---`` between objects), keys in the order they were built."""
    return yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True, width=100)
