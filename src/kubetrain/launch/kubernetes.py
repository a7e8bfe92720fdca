"""Kubernetes launcher: training as a Kubeflow Training Operator ``PyTorchJob`` (kubeflow.org/v1),
and what every job kind's pods share.

``build_pytorchjob`` is a pure function (config -> manifest dict) built with the official
``kubeflow-training`` models; ``PyTorchJobWatcher`` reads a running job (its pods, the leader's
log, whether a queue holds it, why it failed) for the shared lifecycle in
``kubetrain.launch.cluster``. The pods' environment, resources, labels and the checks of what
they can serve (``pod_env``, ``pod_resources``, ``job_labels``, ``check_processes``, ...) and the
watcher's base (``PodJobWatcher``) serve Kubeflow Trainer v2's ``TrainJob`` too
(``kubetrain.launch.trainjob``). ``kubetrain.launch.jobkinds`` picks the kind
(``cluster.training_api``) and holds the ``KubernetesLauncher``; Katib trials and ``kubetrain
manifests`` take the same kind.

How data travels (the PVC contract): the launching step (the KFP train task, or ``kubetrain
train`` on a machine with the claim mounted) and every job pod mount ``cluster.pvc_name`` at
``cluster.mount_path``. For job ``J`` the launcher copies the dataset artifact to
``<mount>/jobs/J/dataset``; the job writes ``<mount>/jobs/J/model`` (checkpoints may go to
``<mount>/jobs/J/checkpoints``, passed as ``KUBETRAIN_CHECKPOINT_DIR``); the launcher copies
the model back into the step's output artifact and removes ``<mount>/jobs/J`` when it deletes
the job (``cluster.cleanup``: by default on success; a failed job's directory is kept with it).

How the pods start: the container runs ``torchrun_command()`` with
``--nproc-per-node=train.nproc``; the node rank and rendezvous address come from the
variables the operator puts in every pod (``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), which the
kubelet expands in ``$(VAR)`` arguments. With ``cluster.elastic`` the operator sets the
``PET_RDZV_*``/``PET_NNODES`` variables instead and torchrun reads them itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from kubetrain.core.errors import ConfigError, KubetrainError
from kubetrain.launch.cluster import JobPaths, condition
from kubetrain.launch.config import JobConfig, cpu_cores
from kubetrain.launch.kubeapi import KubeApi, KubeApiError, LogFollower, Resource
from kubetrain.launch.torchrun import NO_SHARED_STORE, torchrun_command

log = logging.getLogger(__name__)

TRAIN_JOB = PYTORCHJOB = Resource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")
CONTAINER = "pytorch"  # the operator finds the training container by this name
PORT_NAME, PORT = "pytorchjob-port", 23456
CONFIG_ENV = "KUBETRAIN_CONFIG"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
# What Katib needs to know about a trial's job: when it is done (GJSON paths into its status) and
# which pod's log holds the metrics.
TRIAL_SUCCESS_CONDITION = 'status.conditions.#(type=="Succeeded")#|#(status=="True")#'
TRIAL_FAILURE_CONDITION = 'status.conditions.#(type=="Failed")#|#(status=="True")#'
TRIAL_PRIMARY_POD_LABELS = {"training.kubeflow.org/job-role": "master"}
# Waiting reasons that never resolve by themselves: fail at once instead of at the timeout.
FATAL_WAITING = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
}


_cpu_cores = cpu_cores


def threads_per_pod_process(cfg: JobConfig) -> int:
    """Torch/OpenMP threads of each process in a job pod (``OMP_NUM_THREADS``):
    ``train.num_threads``, else the pod's CPU request (``cluster.cpu``) shared out over
    ``train.nproc``, at least 1."""
    if cfg.train.num_threads:
        return cfg.train.num_threads
    return max(1, math.floor(_cpu_cores(cfg.cluster.cpu) / cfg.train.nproc))


def max_restarts(cfg: JobConfig) -> int:
    """``train.max_restarts`` (the same knob as local torchrun), else the elastic default."""
    return cfg.train.max_restarts or cfg.cluster.elastic_max_restarts


def worker_command(
    cfg: JobConfig, dataset: str, output: str, overrides: list[str] | tuple[str, ...] = ()
) -> list[str]:
    """The container command: torchrun running ``kubetrain.launch.worker`` on one node.

    ``overrides`` become ``--set KEY=VALUE`` arguments of the worker (Katib's trial parameters).
    """
    tc = cfg.train
    if cfg.cluster.elastic:  # the operator's PET_* variables tell torchrun how to meet
        rendezvous, restarts = [], max_restarts(cfg)
    else:
        rendezvous = [
            f"--nnodes={tc.nnodes}", "--node-rank=$(RANK)", "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
        ]  # fmt: skip
        restarts = 0
    worker = ["--dataset", dataset, "--config-env", CONFIG_ENV, "--output", output]
    for item in overrides:
        worker += ["--set", item]
    return torchrun_command(tc.nproc, rendezvous, worker, max_restarts=restarts)


def check_processes(cfg: JobConfig) -> None:
    """Refuse a ``train.nproc`` that the job's pods cannot serve.

    With GPUs, one process per GPU (``cluster.num_gpus``, checked by the config); without, no
    more processes than
    the CPU cores each pod requests (``cluster.cpu``, rounded up): more only time-share the
    cores and multiply the memory.

    Raises:
        ConfigError: naming both fields.
    """
    tc, cl = cfg.train, cfg.cluster
    if cl.num_gpus:  # nproc == num_gpus is checked with the config itself
        return
    cores = math.ceil(_cpu_cores(cl.cpu))
    if tc.nproc > max(1, cores):
        raise ConfigError(
            f"config error: train.nproc ({tc.nproc}) is more than the CPU cores each job pod "
            f"requests (cluster.cpu = {cl.cpu}): raise cluster.cpu or lower train.nproc"
        )


# Keys of fsspec storage options (s3fs, gcsfs, adlfs; at any depth, e.g. client_kwargs) and
# environment variables that hold credentials. The config travels inline (KUBETRAIN_CONFIG in
# every pod, the pipeline spec): anything secret there is readable by whoever reads the objects.
CREDENTIAL_OPTIONS = frozenset(
    {
        "key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
        "aws_session_token", "account_key", "sas_token", "connection_string", "client_secret",
        "credential", "credentials",
    }
)  # fmt: skip
# gcsfs's ``token`` may name a way to find credentials rather than hold one.
TOKEN_METHODS = frozenset({"anon", "google_default", "cloud", "cache", "browser"})
CREDENTIAL_ENV = frozenset(
    {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY",
        "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN",
    }
)  # fmt: skip


def _inline_credential(options: Any, where: str) -> str | None:
    """The dotted place of the first credential in ``options`` (nested dicts), or None."""
    if not isinstance(options, dict):
        return None
    for key, value in options.items():
        here = f"{where}.{key}"
        name = str(key).lower()
        secret = name in CREDENTIAL_OPTIONS and value not in (None, "", False)
        method = name == "token" and isinstance(value, str) and value in TOKEN_METHODS
        if secret and not method:
            return here
        found = _inline_credential(value, here)
        if found:
            return found
    return None


def check_no_inline_credentials(cfg: JobConfig) -> None:
    """Refuse a config that would carry object-storage credentials to a cluster inline.

    ``data.storage_options`` (``key``, ``secret``, ``token``, ... at any depth) and
    ``cluster.env`` (``AWS_SECRET_ACCESS_KEY``, ...) go into the job pods' spec and the
    pipeline spec as they are; credentials belong in a Secret (``cluster.storage_secret``).

    Raises:
        ConfigError: one line naming the field and the fix.
    """
    where = _inline_credential(cfg.data.storage_options, "data.storage_options")
    if where is None:
        where = next((f"cluster.env.{k}" for k in cfg.cluster.env if k in CREDENTIAL_ENV), None)
    if where is not None:
        raise ConfigError(
            f"config error: {where}: a credential inline in the config would be written into "
            "every job pod's spec (KUBETRAIN_CONFIG) and the pipeline; put it in a Kubernetes "
            "Secret (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) and name "
            "that Secret in cluster.storage_secret"
        )


# Kueue: the LocalQueue a job joins and its priority (labels on the job; Kueue suspends it at
# creation and un-suspends it once admitted).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


def job_labels(cfg: JobConfig, component: str) -> dict[str, str]:
    """The labels of a job (and of each Katib trial's job): ours, and Kueue's queue and
    priority when ``cluster.queue_name`` / ``cluster.priority_class`` are set."""
    labels = {"app.kubernetes.io/name": "kubetrain", "app.kubernetes.io/component": component}
    if cfg.cluster.queue_name:
        labels[QUEUE_LABEL] = cfg.cluster.queue_name
    if cfg.cluster.priority_class:
        labels[PRIORITY_LABEL] = cfg.cluster.priority_class
    return labels


def prepare_job(
    cfg: JobConfig,
    name: str,
    paths: JobPaths | None,
    command: list[str] | None,
    worker: Callable[[JobConfig, str, str], list[str]],
) -> tuple[JobPaths, list[str], dict[str, str], dict[str, str]]:
    """What every job kind's builder starts from: the checks of what the pods can serve, then
    (its paths on the claim, its command, the job's labels, the pods' labels).

    Raises:
        ConfigError: see ``check_processes`` and ``check_no_inline_credentials``.
    """
    check_processes(cfg)
    check_no_inline_credentials(cfg)
    paths = paths or JobPaths.for_job(cfg, name)
    if command is None:
        command = worker(cfg, paths.dataset, paths.model)
    labels = job_labels(cfg, "train")
    # Kueue's labels belong to the job (it queues jobs), ours to its pods too.
    pod_labels = {k: v for k, v in labels.items() if k.startswith("app.kubernetes.io/")}
    return paths, command, labels, pod_labels


def pod_env(cfg: JobConfig, paths: JobPaths | None) -> dict[str, str]:
    """The environment of the training container, whatever the job kind: the config the
    worker reads, its threads, the checkpoint directory, and ``cluster.env`` (which wins)."""
    cl = cfg.cluster
    env = {
        CONFIG_ENV: cfg.sections_json("data", "model", "train"),
        "OMP_NUM_THREADS": str(threads_per_pod_process(cfg)),
        "PYTHONUNBUFFERED": "1",
    }
    if cl.elastic:  # torchrun's restarts: a fresh store each round (see NO_SHARED_STORE)
        env[NO_SHARED_STORE] = "1"
    if paths is not None:
        env["KUBETRAIN_CHECKPOINT_DIR"] = paths.checkpoints
    env.update(cl.env)  # the user's settings win
    return env


def pod_resources(cfg: JobConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(requests, limits) of each job pod: ``cluster.cpu``/``memory`` requested, the memory
    also as the limit (an OOM is then the pod's own, and says so), GPUs as both."""
    cl = cfg.cluster
    requests = {"cpu": cl.cpu, "memory": cl.memory}
    limits = {"memory": cl.memory}
    if cl.num_gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(cl.num_gpus)
    return requests, limits


def _container(cfg: JobConfig, command: list[str], paths: JobPaths | None) -> Any:
    from kubernetes import client as k8s

    cl = cfg.cluster
    env = pod_env(cfg, paths)
    requests, limits = pod_resources(cfg)
    requests.pop("nvidia.com/gpu", None)  # as the PyTorchJob always had it: the limit only
    return k8s.V1Container(
        name=CONTAINER,
        image=cl.resolved_image(),
        image_pull_policy=cl.image_pull_policy,
        command=command,
        env=[k8s.V1EnvVar(name=k, value=v) for k, v in env.items()],
        # Object-storage credentials: every key of the Secret, never a value in the spec.
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=cl.storage_secret))]
        if cl.storage_secret
        else None,
        ports=[k8s.V1ContainerPort(name=PORT_NAME, container_port=PORT)],
        resources=k8s.V1ResourceRequirements(requests=requests, limits=limits),
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


def _pod_template(cfg: JobConfig, container: Any, labels: dict[str, str]) -> Any:
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
    cfg: JobConfig,
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
    Raises ConfigError if ``train.nproc`` does not fit the pods (``check_processes``) or the
    config holds credentials inline (``check_no_inline_credentials``), KubetrainError if no
    image is set.
    """
    from kubeflow.training import models
    from kubeflow.training.api_client import ApiClient
    from kubernetes import client as k8s

    cl, tc = cfg.cluster, cfg.train
    paths, command, labels, pod_labels = prepare_job(cfg, name, paths, command, worker_command)
    template = _pod_template(
        cfg, _container(cfg, command, paths if checkpoints else None), pod_labels
    )
    backoff = max(cl.backoff_limit, tc.max_restarts)
    replicas, elastic = _replicas(cfg, template, "OnFailure" if backoff else "Never")
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


def _replicas(cfg: JobConfig, template: Any, restart: str) -> tuple[dict[str, Any], Any]:
    """(replica specs, elasticPolicy or None): 1 Master + (nnodes - 1) Workers, or with
    ``cluster.elastic`` nnodes Workers meeting through a c10d rendezvous."""
    from kubeflow.training import models

    tc = cfg.train
    if cfg.cluster.elastic:
        elastic = models.KubeflowOrgV1ElasticPolicy(
            rdzv_backend="c10d",
            min_replicas=tc.nnodes,
            max_replicas=tc.nnodes,
            max_restarts=max_restarts(cfg),
            n_proc_per_node=tc.nproc,
        )
        return {"Worker": models.KubeflowOrgV1ReplicaSpec(tc.nnodes, restart, template)}, elastic
    replicas = {"Master": models.KubeflowOrgV1ReplicaSpec(1, restart, template)}
    if tc.nnodes > 1:
        replicas["Worker"] = models.KubeflowOrgV1ReplicaSpec(tc.nnodes - 1, restart, template)
    return replicas, None


# -- a running job ------------------------------------------------------------------------


def pod_problems(pods: list[Any]) -> tuple[str | None, list[str]]:
    """Read pods as the kubelet reports them.

    Args:
        pods: ``V1Pod`` objects of one job.

    Returns:
        (a problem that will not heal, e.g. ``ImagePullBackOff``, or None; notes worth adding
        to a failure message: containers OOMKilled or ended with an error, unschedulable pods).
    """
    fatal, notes = None, []

    def note(text: str) -> None:
        if text not in notes:
            notes.append(text)

    for pod in pods:
        name = pod.metadata.name
        for cs in (pod.status and pod.status.container_statuses) or []:
            waiting = cs.state and cs.state.waiting
            if waiting and waiting.reason in FATAL_WAITING and fatal is None:
                fatal = f"pod {name}: {waiting.reason}: {waiting.message or cs.image}"
            for state in (cs.state, cs.last_state):
                term = state and state.terminated
                if term and term.reason == "OOMKilled":
                    note(f"pod {name}: container {cs.name} was OOMKilled")
                elif term and term.exit_code:
                    note(
                        f"pod {name}: container {cs.name} exited with code {term.exit_code} "
                        f"({term.reason or 'Error'})"
                    )
        for cond in (pod.status and pod.status.conditions) or []:
            if cond.reason == "Unschedulable" and cond.status == "False":
                note(f"pod {name} cannot be scheduled: {cond.message}")
    return fatal, notes


class PodJobWatcher:
    """The lifecycle's ``Watcher`` for a job that runs pods (PyTorchJob, TrainJob): its pods,
    the leader's log, whether a queue holds it, why it failed. A kind says how to find its pods
    (``pod_selector``), which one leads (``is_leader``), where suspension is written
    (``suspended``) and which condition means success (``success``)."""

    resource: Resource
    container: str
    success = "Succeeded"

    def __init__(self, cfg: JobConfig, emit: Callable[[str], None] = print):
        self.cfg = cfg
        self.emit = emit
        self.notes: list[str] = []
        self.follower: LogFollower | None = None

    def pod_selector(self, name: str) -> str:
        """The label selector of job ``name``'s pods."""
        raise NotImplementedError

    def is_leader(self, labels: dict[str, str]) -> bool:
        """Whether a pod with ``labels`` is the one whose log is followed."""
        raise NotImplementedError

    def suspended(self, obj: dict[str, Any]) -> bool:
        """Whether the job is suspended (a queue such as Kueue holds it until admission)."""
        raise NotImplementedError

    def observe(self, api: KubeApi, obj: dict[str, Any]) -> None:
        """Read the job's pods; start following the leader's log once it runs.

        Raises:
            KubetrainError: a pod cannot start (image pull, container config).
        """
        name = obj["metadata"]["name"]
        try:
            pods = api.pods(self.pod_selector(name))
        except KubeApiError as err:
            if err.status == 0:
                raise  # the lifecycle waits for the server
            log.warning("cannot read the pods of %s: %s", name, err)
            return
        fatal, notes = pod_problems(pods)
        self.notes += [n for n in notes if n not in self.notes]
        if self.follower is None:
            self.follower = self._follow_leader(api, pods)
        if fatal:
            where = self.resource.describe(api.namespace, name)
            raise KubetrainError(f"{where} cannot start: {fatal}")

    def _follow_leader(self, api: KubeApi, pods: list[Any]) -> LogFollower | None:
        for pod in pods:
            started = pod.status and pod.status.phase in ("Running", "Succeeded", "Failed")
            if self.is_leader(pod.metadata.labels or {}) and started:
                return LogFollower(api, pod.metadata.name, self.container, self.emit)
        return None

    def explain(self, what: str, reason: str) -> str:
        """``"<what> failed: <reason> (<pod notes>; <what to change>)"``."""
        cl = self.cfg.cluster
        msg = f"{what} failed: {reason}"
        if any("OOMKilled" in n for n in self.notes):
            msg += f" ({'; '.join(self.notes)}; raise cluster.memory, now {cl.memory})"
        elif self.notes:
            msg += f" ({'; '.join(self.notes)})"
        if "deadline" in reason.lower() and cl.active_deadline_seconds:
            msg += f" (cluster.active_deadline_seconds = {cl.active_deadline_seconds})"
        return msg

    def close(self) -> None:
        """Let the leader's log reach its end (briefly)."""
        if self.follower is not None:
            self.follower.join()


class PyTorchJobWatcher(PodJobWatcher):
    """A PyTorchJob: pods by the operator's job-name label, the master (elastic: worker 0)
    leads, suspension in ``spec.runPolicy.suspend`` or the operator's Suspended condition."""

    resource = TRAIN_JOB
    container = CONTAINER

    def __init__(self, cfg: JobConfig, emit: Callable[[str], None] = print):
        super().__init__(cfg, emit)
        self.leader = "worker" if cfg.cluster.elastic else "master"

    def pod_selector(self, name: str) -> str:
        return f"{JOB_NAME_LABEL}={name}"

    def is_leader(self, labels: dict[str, str]) -> bool:
        return labels.get(REPLICA_TYPE_LABEL) == self.leader

    def suspended(self, obj: dict[str, Any]) -> bool:
        run_policy = (obj.get("spec") or {}).get("runPolicy") or {}
        return bool(run_policy.get("suspend")) or condition(obj, "Suspended")[0] is not None
