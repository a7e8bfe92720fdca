"""The one seam that picks the kind of training job: ``cluster.training_api``.

``trainjob`` is Kubeflow Trainer v2 (``kubetrain.launch.trainjob``), ``pytorchjob`` the Training
Operator v1 (``kubetrain.launch.kubernetes``), ``auto`` asks the API server at launch which one it
serves (TrainJob first: it is what a Kubeflow installed today has, and what Kueue queues by
default). A ``JobKind`` is everything the rest of kubetrain needs of a kind: its resource, the
builder of a training job and of a Katib trial's job, its watcher, and what Katib is told about
it; the train launcher (``KubernetesLauncher``, here), Katib's Experiment and ``kubetrain
manifests`` go through it alone.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetrain.core.errors import ConfigError, KubetrainError
from kubetrain.launch import kubernetes as k
from kubetrain.launch import trainjob as t
from kubetrain.launch.cluster import ClusterJob, JobPaths, check_claim, new_name, run_job
from kubetrain.launch.config import ELASTIC_WITH_TRAINJOB, JobConfig
from kubetrain.launch.kubeapi import KubeApi, Resource
from kubetrain.launch.kubernetes import PodJobWatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobKind:
    """One kind of training job, as the launchers and Katib use it."""

    api: str
    """The ``cluster.training_api`` value that names it."""
    resource: Resource
    build: Callable[..., dict[str, Any]]
    """``build(cfg, name)``: the training job."""
    build_trial: Callable[[JobConfig, str, list[str]], dict[str, Any]]
    """``build_trial(trial_cfg, name, command)``: the job a Katib trial runs."""
    worker_command: Callable[..., list[str]]
    """``worker_command(cfg, dataset, output, overrides)``: the container's torchrun command."""
    watcher: Callable[[JobConfig], PodJobWatcher]
    container: str
    """The training container (Katib's ``primaryContainerName``)."""
    trial_success: str
    trial_failure: str
    trial_primary_pod_labels: dict[str, str]
    installs: str
    """What serves it, for messages and docs."""

    @property
    def crd(self) -> str:
        """``trainjobs.trainer.kubeflow.org``."""
        return f"{self.resource.plural}.{self.resource.group}"


def _trainjob() -> JobKind:
    return JobKind(
        api="trainjob",
        resource=t.TRAINJOB,
        build=t.build_trainjob,
        build_trial=lambda cfg, name, command: t.build_trainjob(
            cfg, name, command=command, checkpoints=False
        ),
        worker_command=t.worker_command,
        watcher=t.TrainJobWatcher,
        container=t.NODE,
        trial_success=t.TRIAL_SUCCESS_CONDITION,
        trial_failure=t.TRIAL_FAILURE_CONDITION,
        trial_primary_pod_labels=dict(t.TRIAL_PRIMARY_POD_LABELS),
        installs="Kubeflow Trainer v2",
    )


def _pytorchjob() -> JobKind:
    return JobKind(
        api="pytorchjob",
        resource=k.PYTORCHJOB,
        build=k.build_pytorchjob,
        # Keep a trial's pods until it ends: Katib's collector sidecar reads the finished log.
        build_trial=lambda cfg, name, command: k.build_pytorchjob(
            cfg, name, command=command, clean_pod_policy="None", checkpoints=False
        ),
        worker_command=k.worker_command,
        watcher=k.PyTorchJobWatcher,
        container=k.CONTAINER,
        trial_success=k.TRIAL_SUCCESS_CONDITION,
        trial_failure=k.TRIAL_FAILURE_CONDITION,
        trial_primary_pod_labels=dict(k.TRIAL_PRIMARY_POD_LABELS),
        installs="the Kubeflow Training Operator v1",
    )


KINDS: dict[str, Callable[[], JobKind]] = {"trainjob": _trainjob, "pytorchjob": _pytorchjob}


def job_kind(api: str) -> JobKind:
    """The kind named ``api`` (``trainjob`` or ``pytorchjob``)."""
    return KINDS[api]()


def offline_kind(cfg: JobConfig) -> JobKind:
    """The kind to render without a cluster to ask: ``cluster.training_api``, and for ``auto``
    TrainJob (PyTorchJob with ``cluster.elastic``, which TrainJob cannot do)."""
    api = cfg.cluster.training_api
    if api == "auto":
        api = "pytorchjob" if cfg.cluster.elastic else "trainjob"
    return job_kind(api)


def resolve_kind(cfg: JobConfig, api: KubeApi) -> JobKind:
    """The kind to launch: ``cluster.training_api``, or for ``auto`` what the API server serves.

    Args:
        cfg: the pipeline config.
        api: the client (asked only with ``auto``).

    Returns:
        The kind. ``auto`` takes TrainJob where ``trainjobs.trainer.kubeflow.org`` is served,
        else PyTorchJob; with ``cluster.elastic``, PyTorchJob where it is served.

    Raises:
        ConfigError: ``auto`` with ``cluster.elastic`` where only TrainJob is served.
        KubetrainError: ``auto`` and the server serves neither kind; or the server cannot be
            asked (``KubeApiError``).
    """
    if cfg.cluster.training_api != "auto":
        return job_kind(cfg.cluster.training_api)
    trainjob, pytorchjob = job_kind("trainjob"), job_kind("pytorchjob")

    def serves(kind: JobKind) -> bool:
        return kind.resource.plural in api.served(kind.resource.group, kind.resource.version)

    has_trainjob = serves(trainjob)
    if cfg.cluster.elastic or not has_trainjob:
        if serves(pytorchjob):
            chosen = pytorchjob
        elif has_trainjob:  # elastic, and only TrainJob here
            raise ConfigError(f"config error: {ELASTIC_WITH_TRAINJOB}")
        else:
            raise KubetrainError(
                f"the API server at {api.host} serves neither {trainjob.crd} (Kubeflow Trainer "
                f"v2) nor {pytorchjob.crd} (Training Operator v1): install Kubeflow Trainer v2.x "
                "with its torch-distributed runtime (or the Training Operator v1.9), see "
                "docs/cluster.md"
            )
    else:
        chosen = trainjob
    log.info(
        "cluster.training_api auto: the API server serves %s: training as a %s",
        chosen.crd, chosen.resource.kind,
    )  # fmt: skip
    return chosen


class KubernetesLauncher:
    """``TrainLauncher`` for ``cluster.backend: kubernetes``: one job per training, of the kind
    ``cluster.training_api`` picks (``kubetrain.launch.jobkinds``): TrainJob or PyTorchJob."""

    def __init__(self, api_factory: Callable[[str], KubeApi] = KubeApi):
        self._api_factory = api_factory

    def run(self, cfg: JobConfig, dataset_dir: Path, out_dir: Path) -> None:
        """Train ``cfg`` as a TrainJob or PyTorchJob; the model lands in ``out_dir``, its
        ``metrics.json`` saying which (``training_api``, ``cluster_job``).

        Raises:
            ConfigError: ``train.nproc`` does not fit the pods, or the kind cannot do what the
                config asks (``cluster.elastic`` with TrainJob).
            KubetrainError: see ``kubetrain.launch.cluster.run_job``; the server serves neither
                kind (``auto``); or the job succeeded without writing a model.
        """
        name = new_name(cfg, "train")
        offline_kind(cfg).build(cfg, name)  # what is wrong with the config fails first
        check_claim(cfg, "TrainJob or PyTorchJob")
        api = self._api_factory(cfg.cluster.namespace)
        api.check_namespace()  # a missing namespace says so before anything else is asked
        kind = resolve_kind(cfg, api)
        job = kind.build(cfg, name)

        def collect(run: ClusterJob, _job: dict[str, Any], paths: JobPaths) -> None:
            from kubetrain.core.artifacts import MODEL_METRICS, TrainedModel

            model = Path(paths.model)
            if not TrainedModel.is_complete(model):
                raise KubetrainError(f"{run.what(name)} succeeded but wrote no model to {model}")
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(model, out_dir, dirs_exist_ok=True)
            # The run says which API trained it (the same model, whatever the kind).
            summary = TrainedModel.load_summary(out_dir)
            summary.training_api, summary.cluster_job = kind.api, run.what(name)
            summary.write(out_dir / MODEL_METRICS)

        run_job(cfg, api, kind.watcher(cfg), job, dataset_dir, collect)
