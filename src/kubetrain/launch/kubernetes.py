"""Kubernetes launcher: training as a Kubeflow Training Operator ``PyTorchJob`` (kubeflow.org/v1).

``build_pytorchjob`` is a pure function (config -> manifest dict) built with the official
``kubeflow-training`` models; ``PyTorchJobClient`` submits it, waits, streams the master's log
and turns a failure into one line with the job's own reason; ``KubernetesLauncher`` is the
``TrainLauncher`` that ties them to artifacts.

How data travels (the PVC contract): the launching step (the KFP train task, or ``kubetrain
train`` on a machine with the claim mounted) and every job pod mount ``cluster.pvc_name`` at
``cluster.mount_path``. For job ``J`` the launcher copies the dataset artifact to
``<mount>/jobs/J/dataset``; the job writes ``<mount>/jobs/J/model`` (checkpoints may go to
``<mount>/jobs/J/checkpoints``, passed as ``KUBETRAIN_CHECKPOINT_DIR``); the launcher copies
the model back into the step's output artifact and removes ``<mount>/jobs/J`` with the job.

How the pods start: the container runs ``python -m torch.distributed.run`` (torchrun) with
``--nproc-per-node=train.nproc``; the node rank and rendezvous address come from the
variables the operator puts in every pod (``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), which the
kubelet expands in ``$(VAR)`` arguments. With ``cluster.elastic`` the operator sets the
``PET_RDZV_*``/``PET_NNODES`` variables instead and torchrun reads them itself.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kubetrain.config import PipelineConfig
from kubetrain.errors import KubetrainError
from kubetrain.launch import NO_SHARED_STORE
from kubetrain.launch.kubeapi import KubeApi, KubeApiError, LogFollower, Poller, Resource

log = logging.getLogger(__name__)

PYTORCHJOB = Resource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")
CONTAINER = "pytorch"  # the operator finds the training container by this name
PORT_NAME, PORT = "pytorchjob-port", 23456
CONFIG_ENV = "KUBETRAIN_CONFIG"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
# Waiting reasons that never resolve by themselves: fail at once instead of at the timeout.
FATAL_WAITING = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
}


class JobFailed(KubetrainError):
    """The job ran and failed (as opposed to: could not start, or was not waited for)."""


@dataclass(frozen=True)
class JobPaths:
    """Where one job's files live on the shared claim (see the module docstring)."""

    root: str
    dataset: str
    model: str
    checkpoints: str

    @classmethod
    def for_job(cls, cfg: PipelineConfig, name: str) -> JobPaths:
        root = PurePosixPath(cfg.cluster.mount_path) / "jobs" / name
        return cls(str(root), str(root / "dataset"), str(root / "model"), str(root / "checkpoints"))


def new_name(cfg: PipelineConfig, kind: str) -> str:
    """A fresh object name: ``<cluster.name_prefix>-<kind>-<6 hex>`` (a DNS-1035 label)."""
    return f"{cfg.cluster.name_prefix}-{kind}-{secrets.token_hex(3)}"


def _cpu_cores(quantity: str) -> float:
    if quantity.endswith("m"):
        return float(quantity[:-1]) / 1000
    return float(re.sub(r"[A-Za-z]+$", "", quantity))


def threads_per_process(cfg: PipelineConfig) -> int:
    """``train.num_threads`` or the pod's CPU request shared out over ``train.nproc``."""
    if cfg.train.num_threads:
        return cfg.train.num_threads
    return max(1, math.floor(_cpu_cores(cfg.cluster.cpu) / cfg.train.nproc))


def max_restarts(cfg: PipelineConfig) -> int:
    """``train.max_restarts`` (the same knob as local torchrun), else the elastic default."""
    return cfg.train.max_restarts or cfg.cluster.elastic_max_restarts


def worker_command(
    cfg: PipelineConfig, dataset: str, output: str, overrides: list[str] | tuple[str, ...] = ()
) -> list[str]:
    """The container command: torchrun running ``kubetrain.train.worker`` on one node.

    ``overrides`` become ``--set KEY=VALUE`` arguments of the worker (Katib's trial parameters).
    """
    tc = cfg.train
    cmd = ["python", "-m", "torch.distributed.run", f"--nproc-per-node={tc.nproc}"]
    if cfg.cluster.elastic:
        cmd += [f"--max-restarts={max_restarts(cfg)}"]
    else:
        cmd += [
            f"--nnodes={tc.nnodes}", "--node-rank=$(RANK)", "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)", "--max-restarts=0",
        ]  # fmt: skip
    cmd += [
        "-m", "kubetrain.train.worker", "--dataset", dataset, "--config-env", CONFIG_ENV,
        "--output", output,
    ]  # fmt: skip
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def _container(cfg: PipelineConfig, command: list[str], paths: JobPaths | None) -> Any:
    from kubernetes import client as k8s

    cl = cfg.cluster
    env = {
        CONFIG_ENV: cfg.sections_json("data", "model", "train"),
        "OMP_NUM_THREADS": str(threads_per_process(cfg)),
        "PYTHONUNBUFFERED": "1",
    }
    if cl.elastic:  # torchrun's restarts: a fresh store each round (see NO_SHARED_STORE)
        env[NO_SHARED_STORE] = "1"
    if paths is not None:
        env["KUBETRAIN_CHECKPOINT_DIR"] = paths.checkpoints
    env.update(cl.env)  # the user's settings win
    limits = {"memory": cl.memory}
    if cl.num_gpus:
        limits["nvidia.com/gpu"] = str(cl.num_gpus)
    return k8s.V1Container(
        name=CONTAINER,
        image=cl.resolved_image(),
        image_pull_policy=cl.image_pull_policy,
        command=command,
        env=[k8s.V1EnvVar(name=k, value=v) for k, v in env.items()],
        ports=[k8s.V1ContainerPort(name=PORT_NAME, container_port=PORT)],
        resources=k8s.V1ResourceRequirements(
            requests={"cpu": cl.cpu, "memory": cl.memory}, limits=limits
        ),
        volume_mounts=[
            k8s.V1VolumeMount(name="data", mount_path=cl.mount_path),
            k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
        ],
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
    )


def _pod_template(cfg: PipelineConfig, container: Any, labels: dict[str, str]) -> Any:
    from kubernetes import client as k8s

    cl = cfg.cluster
    tolerations = [
        k8s.V1Toleration(
            key=t.key or None, operator=t.operator, value=t.value or None, effect=t.effect or None
        )
        for t in cl.tolerations
    ]
    return k8s.V1PodTemplateSpec(
        # An Istio sidecar would keep a finished pod running, and the job with it.
        metadata=k8s.V1ObjectMeta(labels=labels, annotations={"sidecar.istio.io/inject": "false"}),
        spec=k8s.V1PodSpec(
            containers=[container],
            service_account_name=cl.service_account or None,
            node_selector=dict(cl.node_selector) or None,
            tolerations=tolerations or None,
            volumes=[
                k8s.V1Volume(
                    name="data",
                    persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                        claim_name=cl.pvc_name
                    ),
                ),
                # DataLoader workers share batches through /dev/shm; the default 64 MiB is small.
                k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory")),
            ],
        ),
    )


def build_pytorchjob(
    cfg: PipelineConfig,
    name: str,
    paths: JobPaths | None = None,
    *,
    command: list[str] | None = None,
    clean_pod_policy: str | None = None,
    checkpoints: bool = True,
) -> dict[str, Any]:
    """The PyTorchJob for ``cfg.train`` on the cluster, as the dict sent to the API server.

    1 Master + (``train.nnodes`` - 1) Workers (with ``cluster.elastic``: ``train.nnodes``
    Workers and an elasticPolicy), ``nprocPerNode = train.nproc``. ``paths`` defaults to
    ``JobPaths.for_job(cfg, name)``; ``command`` replaces the worker command (Katib trials).
    ``checkpoints=False`` gives the pods no checkpoint directory: Katib trials of one experiment
    share a name prefix, and one trial must never resume another's checkpoint.
    Raises KubetrainError if no image is set.
    """
    from kubeflow.training import models
    from kubeflow.training.api_client import ApiClient
    from kubernetes import client as k8s

    cl, tc = cfg.cluster, cfg.train
    paths = paths or JobPaths.for_job(cfg, name)
    if command is None:
        command = worker_command(cfg, paths.dataset, paths.model)
    labels = {"app.kubernetes.io/name": "kubetrain", "app.kubernetes.io/component": "train"}
    template = _pod_template(cfg, _container(cfg, command, paths if checkpoints else None), labels)
    backoff = max(cl.backoff_limit, tc.max_restarts)
    restart = "OnFailure" if backoff else "Never"
    if cl.elastic:
        replicas = {"Worker": models.KubeflowOrgV1ReplicaSpec(tc.nnodes, restart, template)}
        elastic = models.KubeflowOrgV1ElasticPolicy(
            rdzv_backend="c10d",
            min_replicas=tc.nnodes,
            max_replicas=tc.nnodes,
            max_restarts=max_restarts(cfg),
            n_proc_per_node=tc.nproc,
        )
    else:
        replicas = {"Master": models.KubeflowOrgV1ReplicaSpec(1, restart, template)}
        if tc.nnodes > 1:
            replicas["Worker"] = models.KubeflowOrgV1ReplicaSpec(tc.nnodes - 1, restart, template)
        elastic = None
    job = models.KubeflowOrgV1PyTorchJob(
        api_version=f"{PYTORCHJOB.group}/{PYTORCHJOB.version}",
        kind=PYTORCHJOB.kind,
        metadata=k8s.V1ObjectMeta(name=name, namespace=cl.namespace, labels=labels),
        spec=models.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(tc.nproc),
            pytorch_replica_specs=replicas,
            elastic_policy=elastic,
            run_policy=models.KubeflowOrgV1RunPolicy(
                clean_pod_policy=clean_pod_policy or cl.clean_pod_policy,
                backoff_limit=backoff,
                active_deadline_seconds=cl.active_deadline_seconds,
                ttl_seconds_after_finished=cl.ttl_seconds_after_finished,
            ),
        ),
    )
    return ApiClient().sanitize_for_serialization(job)


# -- status -------------------------------------------------------------------------------


def job_outcome(job: dict[str, Any]) -> tuple[str | None, str]:
    """("Succeeded" | "Failed" | None, "reason: message") from the job's status conditions."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Succeeded", "Failed"):
            text = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
            return cond["type"], text or cond["type"]
    return None, ""


def pod_problems(pods: list[Any]) -> tuple[str | None, list[str]]:
    """(a fatal problem that will not heal, notes worth adding to a failure message)."""
    fatal, notes = None, []
    for pod in pods:
        name = pod.metadata.name
        for cs in (pod.status and pod.status.container_statuses) or []:
            waiting = cs.state and cs.state.waiting
            if waiting and waiting.reason in FATAL_WAITING and fatal is None:
                fatal = f"pod {name}: {waiting.reason}: {waiting.message or cs.image}"
            for state in (cs.state, cs.last_state):
                term = state and state.terminated
                if term and term.reason == "OOMKilled":
                    note = f"pod {name}: container {cs.name} was OOMKilled"
                    if note not in notes:
                        notes.append(note)
        for cond in (pod.status and pod.status.conditions) or []:
            if cond.reason == "Unschedulable" and cond.status == "False":
                note = f"pod {name} cannot be scheduled: {cond.message}"
                if note not in notes:
                    notes.append(note)
    return fatal, notes


class PyTorchJobClient:
    """Submit a PyTorchJob, wait for it while streaming the master's log, clean up."""

    def __init__(self, cfg: PipelineConfig, api: KubeApi | None = None):
        self.cfg = cfg
        self.api = api or KubeApi(cfg.cluster.namespace)

    def what(self, name: str) -> str:
        return PYTORCHJOB.describe(self.api.namespace, name)

    def submit(self, job: dict[str, Any]) -> str:
        name = job["metadata"]["name"]
        self.api.create(PYTORCHJOB, job)
        log.info("submitted %s", self.what(name))
        return name

    def wait(self, name: str, emit: Callable[[str], None] = print) -> None:
        """Block until the job succeeds; raise KubetrainError with its reason otherwise."""
        cl = self.cfg.cluster
        leader = "worker" if cl.elastic else "master"
        selector = f"{JOB_NAME_LABEL}={name}"
        poller = Poller(cl.wait_timeout_seconds, cl.poll_seconds)
        follower: LogFollower | None = None
        notes: list[str] = []
        while True:
            job = poller.fetch(lambda: self.api.get(PYTORCHJOB, name))
            if job is not None:
                outcome, text = job_outcome(job)
                pods = poller.fetch(lambda: self.api.pods(selector)) or []
                fatal, new_notes = pod_problems(pods)
                notes += [n for n in new_notes if n not in notes]
                if follower is None:
                    follower = self._follow_leader(pods, leader, emit)
                if outcome == "Succeeded":
                    if follower:
                        follower.join()
                    return
                if outcome == "Failed":
                    if follower:
                        follower.join()
                    raise JobFailed(self._failure(name, text, notes))
                if fatal:
                    raise KubetrainError(f"{self.what(name)} cannot start: {fatal}")
            if poller.expired():
                detail = f" ({'; '.join(notes)})" if notes else ""
                raise KubetrainError(
                    f"{self.what(name)} did not finish within cluster.wait_timeout_seconds = "
                    f"{cl.wait_timeout_seconds}{detail}"
                )
            poller.sleep()

    def _follow_leader(self, pods: list[Any], leader: str, emit) -> LogFollower | None:
        for pod in pods:
            labels = pod.metadata.labels or {}
            started = pod.status and pod.status.phase in ("Running", "Succeeded", "Failed")
            if labels.get(REPLICA_TYPE_LABEL) == leader and started:
                return LogFollower(self.api, pod.metadata.name, CONTAINER, emit)
        return None

    def _failure(self, name: str, text: str, notes: list[str]) -> str:
        msg = f"{self.what(name)} failed: {text}"
        if any("OOMKilled" in n for n in notes):
            msg += f" ({'; '.join(notes)}; raise cluster.memory, now {self.cfg.cluster.memory})"
        elif notes:
            msg += f" ({'; '.join(notes)})"
        if "deadline" in text.lower() and self.cfg.cluster.active_deadline_seconds:
            msg += (
                f" (cluster.active_deadline_seconds = {self.cfg.cluster.active_deadline_seconds})"
            )
        return msg

    def delete(self, name: str) -> None:
        try:
            if self.api.delete(PYTORCHJOB, name):
                log.info("deleted %s", self.what(name))
        except KubeApiError as err:
            log.warning("could not delete %s: %s", self.what(name), err)


def should_delete(cleanup: str, succeeded: bool, finished: bool) -> bool:
    """The ``cluster.cleanup`` rule; a job we stopped watching (not finished) is removed."""
    if cleanup == "never":
        return False
    if cleanup == "always" or not finished:
        return True
    return succeeded


class KubernetesLauncher:
    """``TrainLauncher`` for ``cluster.backend: kubernetes``: one PyTorchJob per training."""

    def __init__(self, api_factory: Callable[[str], KubeApi] = KubeApi):
        self._api_factory = api_factory

    def run(self, cfg: PipelineConfig, dataset_dir: Path, out_dir: Path) -> None:
        name = new_name(cfg, "train")
        paths = JobPaths.for_job(cfg, name)
        job = build_pytorchjob(cfg, name, paths)  # raises first if no image is set
        api = self._api_factory(cfg.cluster.namespace)
        mount = Path(cfg.cluster.mount_path)
        if not mount.is_dir():
            raise KubetrainError(
                f"cluster.mount_path {mount} does not exist here: the step that launches a "
                f"PyTorchJob must mount PVC '{cfg.cluster.pvc_name}' there (the pipeline does "
                "this on a cluster)"
            )
        api.check_namespace()
        client = PyTorchJobClient(cfg, api)
        root = Path(paths.root)
        shutil.copytree(dataset_dir, paths.dataset)
        submitted = succeeded = finished = False
        try:
            client.submit(job)
            submitted = True
            try:
                client.wait(name)
                succeeded = finished = True
            except JobFailed:
                finished = True
                raise
            model = Path(paths.model)
            if not (model / "model.json").is_file():
                raise KubetrainError(f"{client.what(name)} succeeded but wrote no model to {model}")
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(model, out_dir, dirs_exist_ok=True)
        finally:
            delete = should_delete(cfg.cluster.cleanup, succeeded, finished)
            if submitted and delete:
                client.delete(name)
            if not submitted or delete:
                shutil.rmtree(root, ignore_errors=True)
