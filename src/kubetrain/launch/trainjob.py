"""Training as a Kubeflow Trainer v2 ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``).

A TrainJob names a training runtime (``runtimeRef``: ``cluster.runtime``, by default the
``torch-distributed`` ClusterTrainingRuntime that Trainer ships) and says what differs for this
job: ``trainer`` (image, command, env, ``numNodes``, ``numProcPerNode``, ``resourcesPerNode``) and
``runtimePatches`` for what the trainer fields cannot say (the claim and ``/dev/shm``, the
service account, node selector, tolerations, the restricted security context). The Trainer
controller turns it into a JobSet whose replicated job ``node`` runs ``train.nnodes`` pods; its
torch plugin puts ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``
and ``PET_MASTER_PORT`` into the ``node`` container, which our torchrun command reads.

``build_trainjob`` is a pure function (config -> the dict the API server gets), passed through
the official ``kubeflow-trainer-api`` models; ``TrainJobWatcher`` reads a running one for the
shared lifecycle (``kubetrain.launch.cluster``): pods by the labels JobSet puts on them, the
``Complete`` / ``Failed`` / ``Suspended`` conditions the controller writes.

What TrainJob's API has no field for, kubetrain does not pretend to set: the image pull policy,
pod restarts and the time-to-live of a finished job are the runtime's (its JobSet template);
elastic training has no API since Trainer v2.2 (``cluster.elastic`` is refused); and since a
runtime patch may not set the ``node`` container's environment, the storage Secret reaches the
pods key by key (``STORAGE_SECRET_KEYS``, each optional) rather than as ``envFrom``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubetrain.core.errors import ConfigError
from kubetrain.launch.cluster import JobPaths, condition
from kubetrain.launch.config import ELASTIC_WITH_TRAINJOB, JobConfig
from kubetrain.launch.kubeapi import Resource
from kubetrain.launch.kubernetes import (
    CONFIG_ENV,
    PodJobWatcher,
    pod_env,
    pod_resources,
    prepare_job,
)
from kubetrain.launch.torchrun import torchrun_command

TRAINJOB = Resource("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")
# The torch runtime's replicated job and container of the trainer (its
# `trainer.kubeflow.org/trainjob-ancestor-step: trainer` template).
NODE = "node"
# Who owns our entry of spec.runtimePatches (Kueue writes its own, "kueue.x-k8s.io/manager").
PATCH_MANAGER = "kubetrain"
# Labels JobSet puts on every pod it creates (the JobSet is named after the TrainJob).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# What the torch runtime injects; the Trainer's webhook refuses them in trainer.env.
PET_VARIABLES = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                 "PET_MASTER_PORT")  # fmt: skip
# Object-storage credentials the pods read (s3fs/botocore), each taken from
# cluster.storage_secret if the Secret has it.
STORAGE_SECRET_KEYS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)  # fmt: skip
# Katib (v0.19+) with TrainJob trials: its own defaults for this kind, written out.
TRIAL_SUCCESS_CONDITION = 'status.conditions.#(type=="Complete")#|#(status=="True")#'
TRIAL_FAILURE_CONDITION = 'status.conditions.#(type=="Failed")#|#(status=="True")#'
TRIAL_PRIMARY_POD_LABELS = {REPLICATED_JOB_LABEL: NODE, COMPLETION_INDEX_LABEL: "0"}


def worker_command(
    cfg: JobConfig, dataset: str, output: str, overrides: list[str] | tuple[str, ...] = ()
) -> list[str]:
    """The ``node`` container's command: torchrun running ``kubetrain.train.worker``, every
    rendezvous setting from the ``PET_*`` variables the runtime injects (the kubelet expands
    ``$(VAR)``), so the pods meet as the runtime placed them.

    ``overrides`` become ``--set KEY=VALUE`` arguments of the worker (Katib's trial parameters).
    """
    rendezvous = [
        "--nnodes=$(PET_NNODES)", "--node-rank=$(PET_NODE_RANK)",
        "--master-addr=$(PET_MASTER_ADDR)", "--master-port=$(PET_MASTER_PORT)",
    ]  # fmt: skip
    worker = ["--dataset", dataset, "--config-env", CONFIG_ENV, "--output", output]
    for item in overrides:
        worker += ["--set", item]
    return torchrun_command("$(PET_NPROC_PER_NODE)", rendezvous, worker)


def check_trainjob(cfg: JobConfig) -> None:
    """Refuse what a TrainJob cannot carry.

    Raises:
        ConfigError: ``cluster.elastic`` (no elastic API since Trainer v2.2), or a
            ``cluster.env`` entry the runtime sets itself (``PET_*``).
    """
    if cfg.cluster.elastic:
        raise ConfigError(f"config error: {ELASTIC_WITH_TRAINJOB}")
    reserved = sorted(k for k in cfg.cluster.env if k in PET_VARIABLES)
    if reserved:
        raise ConfigError(
            f"config error: cluster.env.{reserved[0]}: the TrainJob runtime sets it (from "
            "train.nnodes and train.nproc); remove it from cluster.env"
        )


def _env(cfg: JobConfig, paths: JobPaths | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in pod_env(cfg, paths).items()]
    secret = cfg.cluster.storage_secret
    if secret:
        given = {e["name"] for e in env}
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key,
                                                         "optional": True}}}
            for key in STORAGE_SECRET_KEYS
            if key not in given
        ]  # fmt: skip
    return env


def _pod_patch(cfg: JobConfig, labels: dict[str, str]) -> dict[str, Any]:
    """The ``node`` pods' part of ``runtimePatches``: what ``trainer`` has no field for."""
    cl = cfg.cluster
    spec: dict[str, Any] = {
        "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": cl.pvc_name}},
            # DataLoader workers share batches through /dev/shm; the default 64 MiB is small.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
        "containers": [
            {
                "name": NODE,
                "volumeMounts": [
                    {"name": "data", "mountPath": cl.mount_path},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
            }
        ],
    }
    if cl.service_account:
        spec["serviceAccountName"] = cl.service_account
    if cl.node_selector:
        spec["nodeSelector"] = dict(cl.node_selector)
    if cl.tolerations:
        spec["tolerations"] = [
            {k: v for k, v in t.model_dump().items() if v} for t in cl.tolerations
        ]
    return {
        # An Istio sidecar would keep a finished pod running, and the job with it.
        "metadata": {"labels": labels, "annotations": {"sidecar.istio.io/inject": "false"}},
        "spec": spec,
    }


def build_trainjob(
    cfg: JobConfig,
    name: str,
    paths: JobPaths | None = None,
    *,
    command: list[str] | None = None,
    checkpoints: bool = True,
) -> dict[str, Any]:
    """The TrainJob for ``cfg.train`` on the cluster, as the dict sent to the API server.

    Args:
        cfg: the pipeline config (``train.nnodes`` nodes of ``train.nproc`` processes, the pods
            as ``cluster.*`` says).
        name: the TrainJob's name (the JobSet and its pods are named after it).
        paths: where the job's files live on the claim (default ``JobPaths.for_job``).
        command: replaces the worker command (Katib trials).
        checkpoints: False gives the pods no checkpoint directory (Katib trials of one
            experiment must never resume each other's checkpoints).

    Returns:
        The TrainJob as the official ``kubeflow-trainer-api`` models serialize it.

    Raises:
        ConfigError: the processes do not fit the pods, a credential is inline, or the config
            asks for what a TrainJob cannot do (``check_trainjob``).
        KubetrainError: no image is set.
    """
    from kubeflow_trainer_api import models

    cl, tc = cfg.cluster, cfg.train
    check_trainjob(cfg)
    paths, command, labels, pod_labels = prepare_job(cfg, name, paths, command, worker_command)
    requests, limits = pod_resources(cfg)
    # The runtime's `node` replicated job, its pod template patched (JobSet > Job > Pod).
    node = {"name": NODE, "template": {"spec": {"template": _pod_patch(cfg, pod_labels)}}}
    spec: dict[str, Any] = {
        "runtimeRef": {
            "name": cl.runtime,
            "apiGroup": TRAINJOB.group,
            "kind": cl.runtime_kind,
        },
        "trainer": {
            "image": cl.resolved_image(),
            "command": command,
            "env": _env(cfg, paths if checkpoints else None),
            "numNodes": tc.nnodes,
            "numProcPerNode": tc.nproc,
            "resourcesPerNode": {"requests": requests, "limits": limits},
        },
        "runtimePatches": [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node]}}},
            }
        ],
    }
    if cl.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = cl.active_deadline_seconds
    body = {
        "apiVersion": f"{TRAINJOB.group}/{TRAINJOB.version}",
        "kind": TRAINJOB.kind,
        "metadata": {"name": name, "namespace": cl.namespace, "labels": labels},
        "spec": spec,
    }
    return models.TrainerV1alpha1TrainJob.from_dict(body).to_dict()


class TrainJobWatcher(PodJobWatcher):
    """The lifecycle's ``Watcher`` for a TrainJob: pods by JobSet's labels, node 0 leads,
    ``Complete`` is success, ``spec.suspend`` or a true ``Suspended`` condition is a queue."""

    resource = TRAINJOB
    container = NODE
    success = "Complete"

    def __init__(self, cfg: JobConfig, emit: Callable[[str], None] = print):
        super().__init__(cfg, emit)

    def pod_selector(self, name: str) -> str:
        return f"{JOBSET_NAME_LABEL}={name}"

    def is_leader(self, labels: dict[str, str]) -> bool:
        return (
            labels.get(REPLICATED_JOB_LABEL) == NODE
            and labels.get(JOB_INDEX_LABEL, "0") == "0"
            and labels.get(COMPLETION_INDEX_LABEL) == "0"
        )

    def suspended(self, obj: dict[str, Any]) -> bool:
        if (obj.get("spec") or {}).get("suspend"):
            return True
        return condition(obj, "Suspended")[0] is not None
