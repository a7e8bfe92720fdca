"""Every object a cluster run creates, exactly as the launchers send them (``kubetrain manifests``).

The tune step creates a Katib Experiment (if ``tune.enabled``), the train step a TrainJob or a
PyTorchJob (``cluster.training_api``); both through the same builders used here, under fresh
names. The train job is shown with the config as given: in a run it trains with the tuned
parameters applied. Offline there is no API server to ask, so ``auto`` is rendered as TrainJob
(PyTorchJob with ``cluster.elastic``), and the YAML says so in a comment at its top.
"""

from __future__ import annotations

import textwrap
from typing import Any

import yaml

from kubetrain.launch.jobkinds import job_kind, offline_kind
from kubetrain.pipeline.config import PipelineConfig


def cluster_manifests(
    cfg: PipelineConfig, train_name: str | None = None, tune_name: str | None = None
) -> list[dict[str, Any]]:
    """[Experiment (if tuning), TrainJob or PyTorchJob] for ``cfg``.

    Raises:
        KubetrainError: no image is set; ConfigError: the job kind cannot serve the config.
    """
    from kubetrain.launch.cluster import new_name
    from kubetrain.tune.katib import build_experiment

    kind = offline_kind(cfg)
    docs = []
    if cfg.tune.enabled:
        docs.append(build_experiment(cfg, tune_name or new_name(cfg, "tune"), kind=kind))
    docs.append(kind.build(cfg, train_name or new_name(cfg, "train")))
    return docs


def header(cfg: PipelineConfig) -> str:
    """The comment at the top of the YAML: which training API it shows, and why."""
    kind = offline_kind(cfg)
    if cfg.cluster.training_api != "auto":
        return f"# cluster.training_api: {kind.api}\n"
    other = "pytorchjob" if kind.api == "trainjob" else "trainjob"
    why = (
        "cluster.elastic needs it"
        if cfg.cluster.elastic
        else "what a Kubeflow installed today serves"
    )
    text = (
        f"cluster.training_api: auto, rendered offline as {kind.resource.kind} ({why}). At "
        f"launch kubetrain asks the API server: a cluster without {kind.crd} gets a "
        f"{job_kind(other).resource.kind}. --set cluster.training_api={other} shows that one."
    )
    return "".join(f"# {line}\n" for line in textwrap.wrap(text, 98))


def to_yaml(docs: list[dict[str, Any]], comment: str = "") -> str:
    """Multi-document YAML (``---`` between objects), keys in the order they were built, after
    ``comment`` (``#`` lines)."""
    return comment + yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True, width=100)
