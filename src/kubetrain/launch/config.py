"""The ``cluster`` config section: where the heavy steps run and how their pods look.

The patterns are Kubernetes' own: DNS-1123 names and resource quantities, checked here so that
a typo fails at config time, not when the API server refuses the object.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from kubetrain.core.config import Section
from kubetrain.core.errors import KubetrainError
from kubetrain.train.config import TrainingConfig

# Kubernetes names: a DNS-1123 label (namespaces, name prefixes) or subdomain (claims, ...).
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A resource quantity as Kubernetes writes it: "2", "500m", "1.5", "4Gi", "512M".
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


def cpu_cores(quantity: str) -> float:
    """A CPU quantity (``"500m"``, ``"2"``) in cores."""
    if quantity.endswith("m"):
        return float(quantity[:-1]) / 1000
    return float(re.sub(r"[A-Za-z]+$", "", quantity))


ELASTIC_WITH_TRAINJOB = (
    "cluster.elastic: TrainJob (Kubeflow Trainer v2) has no elastic training API since v2.2: "
    "set cluster.training_api=pytorchjob (Training Operator v1) or cluster.elastic=false"
)


class Toleration(Section):
    """One pod toleration (Kubernetes ``tolerations`` entry), e.g. for tainted GPU nodes."""

    key: str = Field("", description="Taint key to tolerate; empty with Exists: every taint.")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal or Exists.")
    value: str = Field("", description="Taint value (operator Equal).")
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = Field(
        "", description="Taint effect to tolerate; empty: all effects."
    )


class StepPod(Section):
    """The pod of one pipeline step (a KFP task) on a KFP server; in a step's own entry, an
    unset field is ``cluster.steps.default``'s."""

    cpu: str | None = Field(None, pattern=_QUANTITY, description="CPU request.")
    cpu_limit: str | None = Field(
        None, pattern=_QUANTITY, description="CPU limit; unset: the CPU request."
    )
    memory: str | None = Field(None, pattern=_QUANTITY, description="Memory request and limit.")
    gpus: int | None = Field(None, ge=0, le=16, description="nvidia.com/gpu of the step.")
    node_selector: dict[str, str] | None = Field(
        None,
        description="nodeSelector of the step's pod; unset on a step with GPUs: "
        "cluster.node_selector (where the GPU job pods go).",
    )
    tolerations: list[Toleration] | None = Field(
        None,
        description="Tolerations of the step's pod; unset on a step with GPUs: "
        "cluster.tolerations.",
    )

    @model_validator(mode="after")
    def _limit_not_below_request(self) -> StepPod:
        if self.cpu and self.cpu_limit and cpu_cores(self.cpu_limit) < cpu_cores(self.cpu):
            raise ValueError(f"cpu_limit ({self.cpu_limit}) is below cpu ({self.cpu})")
        return self

    @field_validator("cpu", "cpu_limit", "memory", mode="before")
    @classmethod
    def _quantity_as_text(cls, value: Any) -> Any:
        # `--set cluster.steps.evaluate.cpu=4` arrives as a YAML number.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value


def _step(description: str) -> Any:
    return Field(default_factory=StepPod, description=description)


class StepsConfig(Section):
    """Resources of the pipeline's own step pods (KFP tasks): ``default`` for every step, and one
    entry per step whose set fields override it (e.g. ``cluster.steps.evaluate.gpus: 1``)."""

    default: StepPod = Field(
        default_factory=lambda: StepPod(cpu="1", cpu_limit="2", memory="2Gi", gpus=0),
        description="What every step's pod gets unless its own entry says otherwise.",
    )
    run_params: StepPod = _step("The run-params step (merges the run's parameters).")
    preprocess: StepPod = _step("The preprocess step (reads, splits and shards the data).")
    preprocess_plan: StepPod = _step(
        "With data.parallel_tasks > 1, the plan task (lists the source, splits it, trains the "
        "tokenizer); an unset field is preprocess's, then default's."
    )
    preprocess_convert: StepPod = _step(
        "With data.parallel_tasks > 1, each convert task (decodes or tokenizes a range of "
        "shards with data.num_workers processes: give it that many cores); an unset field is "
        "preprocess's, then default's."
    )
    preprocess_merge: StepPod = _step(
        "With data.parallel_tasks > 1, the merge task (checks the ranges, gathers the shards, "
        "writes the manifest); an unset field is preprocess's, then default's."
    )
    check_changed: StepPod = _step("The check-changed step (retrain.only_if_changed).")
    tune: StepPod = _step("The tune step (Optuna trials in the pod, or Katib's launcher).")
    train: StepPod = _step("The train step (torchrun in the pod, or the job's launcher).")
    quantize: StepPod = _step("The quantize step (calibration, QAT, the accuracy gate).")
    evaluate: StepPod = _step("The evaluate step (fp32 and int8 on the whole test split).")
    check_accuracy: StepPod = _step("The check-accuracy step (the promotion gate).")
    promote: StepPod = _step("The promote step.")
    reject: StepPod = _step("The reject step.")
    track: StepPod = _step("The track step (MLflow).")

    def for_step(self, task: str) -> StepPod:
        """The pod of the KFP task ``task`` (``check-accuracy``, ...): its own entry's set
        fields over ``default``'s (GPU placement: ``ClusterConfig.step_pod``).

        Raises:
            KeyError: ``task`` is not a step of the pipeline.
        """
        key = task.replace("-", "_")
        own = getattr(self, key) if task != "default" else self.default
        if not isinstance(own, StepPod):
            raise KeyError(task)
        merged = self.default.model_dump()
        # The fanned-out preprocess tasks take preprocess's entry first, then their own.
        layers = [self.preprocess, own] if key in _PREPROCESS_TASKS else [own]
        for layer in layers:
            mine = {k: v for k, v in layer.model_dump().items() if v is not None}
            if "cpu" in mine and "cpu_limit" not in mine:
                merged["cpu_limit"] = None  # its own request, not the default's limit
            merged.update(mine)
        return StepPod.model_validate(merged)


_PREPROCESS_TASKS = ("preprocess_plan", "preprocess_convert", "preprocess_merge")


class ClusterConfig(Section):
    """Where the heavy steps run, and how their pods look on Kubernetes.

    On ``kubernetes`` the dataset, checkpoints and model travel through one PersistentVolumeClaim
    (``pvc_name``) that the launching step and every job pod mount at ``mount_path``: the
    launcher copies the dataset artifact to ``<mount_path>/jobs/<job>/dataset``, the job writes
    ``.../model`` (and ``.../checkpoints``), and the launcher copies the model back.
    """

    backend: Literal["local", "kubernetes"] = Field(
        "local",
        description="local: torchrun processes and Optuna; kubernetes: TrainJob or PyTorchJob "
        "(training_api) and Katib.",
    )
    training_api: Literal["auto", "trainjob", "pytorchjob"] = Field(
        "auto",
        description="The job kind of training and of Katib's trials: trainjob (Kubeflow Trainer "
        "v2, trainer.kubeflow.org/v1alpha1), pytorchjob (Training Operator v1, kubeflow.org/v1), "
        "or auto: TrainJob where the API server serves it, else PyTorchJob (asked at launch).",
    )
    runtime: str = Field(
        "torch-distributed",
        pattern=_DNS_SUBDOMAIN,
        description="TrainJob: the training runtime its runtimeRef names (Trainer's default "
        "ClusterTrainingRuntime is torch-distributed).",
    )
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = Field(
        "ClusterTrainingRuntime",
        description="TrainJob: the kind of runtime (a TrainingRuntime lives in cluster.namespace).",
    )
    queue_name: str = Field(
        "",
        max_length=253,
        pattern="^(" + _DNS_SUBDOMAIN[1:-1] + ")?$",  # empty: none
        description="Kueue LocalQueue of the jobs and Katib trials (label "
        "kueue.x-k8s.io/queue-name); empty: not queued by name.",
    )
    priority_class: str = Field(
        "",
        max_length=253,
        pattern="^(" + _DNS_SUBDOMAIN[1:-1] + ")?$",
        description="Kueue WorkloadPriorityClass of the jobs and trials (label "
        "kueue.x-k8s.io/priority-class); empty: the queue's default.",
    )
    namespace: str = Field(
        "kubeflow", pattern=_DNS_LABEL, description="Namespace of the jobs and Experiments."
    )
    image: str | None = Field(
        None,
        min_length=1,
        pattern=r"^\S+$",
        description="Image of the pipeline's steps and of the job pods alike (a model of your "
        "own must be importable in all of them); unset: KUBETRAIN_IMAGE, else the runtime image "
        "of this version.",
    )
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field(
        "IfNotPresent",
        description="Pull policy of the PyTorchJob pods' image (a TrainJob's pods take the "
        "runtime's).",
    )
    service_account: str = Field(
        "", description="Service account of the job pods; empty: the namespace's default."
    )
    name_prefix: str = Field(
        "kubetrain",
        max_length=30,
        pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
        description="Prefix of the job and Experiment names (a random suffix follows).",
    )
    cpu: str = Field(
        "2",
        pattern=_QUANTITY,
        description="CPU request of each job pod; without GPUs train.nproc may not exceed it "
        "(the default matches train.nproc's).",
    )
    memory: str = Field(
        "2Gi", pattern=_QUANTITY, description="Memory request and limit of each job pod."
    )
    num_gpus: int = Field(
        0, ge=0, le=16, description="nvidia.com/gpu per job pod (set train.nproc to match)."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="nodeSelector of the job pods."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations of the job pods."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables of the job pods."
    )
    storage_secret: str = Field(
        "",
        max_length=253,
        pattern="^(" + _DNS_SUBDOMAIN[1:-1] + ")?$",  # empty: none
        description="Kubernetes Secret holding object-storage credentials (keys such as "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL): every key becomes an "
        "environment variable of the job pods (envFrom), where s3fs/gcsfs read it. Credentials "
        "never go inline: data.storage_options with key/secret/token is refused on a cluster.",
    )
    pvc_name: str = Field(
        "kubetrain-data",
        pattern=_DNS_SUBDOMAIN,
        description="PersistentVolumeClaim (ReadWriteMany for several nodes) holding datasets, "
        "checkpoints and models of cluster jobs.",
    )
    mount_path: str = Field(
        "/mnt/kubetrain",
        pattern=r"^/\S*$",
        description="Where the launching step and the job pods mount pvc_name.",
    )
    clean_pod_policy: Literal["None", "Running", "All"] = Field(
        "Running", description="runPolicy.cleanPodPolicy: which pods to delete when a job ends."
    )
    backoff_limit: int = Field(
        0, ge=0, description="runPolicy.backoffLimit: pod restarts before the job fails."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="runPolicy.activeDeadlineSeconds: the job fails after this long."
    )
    ttl_seconds_after_finished: int | None = Field(
        86400, ge=0, description="runPolicy.ttlSecondsAfterFinished: delete a finished job."
    )
    elastic: bool = Field(
        False,
        description="PyTorchJob only: add an elasticPolicy (c10d rendezvous, torchrun restarts). "
        "The node count stays train.nnodes: the global batch is fixed by train.batch_size. "
        "TrainJob has no elastic API (Kubeflow Trainer v2.2+).",
    )
    elastic_max_restarts: int = Field(
        3, ge=0, description="elasticPolicy.maxRestarts (with elastic)."
    )
    wait_timeout_seconds: int = Field(
        6 * 3600, ge=1, description="How long the launcher waits for a job or experiment."
    )
    poll_seconds: float = Field(5.0, gt=0, description="Seconds between status checks.")
    cleanup: Literal["always", "on_success", "never"] = Field(
        "on_success",
        description="Delete the job/experiment when it ends: always, only on success (keep a "
        "failed one to inspect), or never. A job the launcher stops waiting for (timeout, "
        "image pull error, interrupt) is deleted unless never.",
    )

    steps: StepsConfig = Field(
        default_factory=StepsConfig,
        description="Resources of the pipeline's own step pods on a KFP server: "
        "cluster.steps.default.* for all, cluster.steps.<step>.* for one (e.g. "
        "cluster.steps.evaluate.gpus=1).",
    )

    @field_validator("elastic")
    @classmethod
    def _elastic_needs_pytorchjob(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("training_api") == "trainjob":
            raise ValueError(ELASTIC_WITH_TRAINJOB.removeprefix("cluster.elastic: "))
        return value

    def step_pod(self, name: str) -> StepPod:
        """The pod of pipeline step ``name``: its entry over the default; a step with GPUs and
        no placement of its own goes where the job pods go (``node_selector``, ``tolerations``)."""
        pod = self.steps.for_step(name)
        if pod.gpus:
            if pod.node_selector is None:
                pod.node_selector = dict(self.node_selector)
            if pod.tolerations is None:
                pod.tolerations = list(self.tolerations)
        return pod

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity_as_text(cls, value: Any) -> Any:
        # `--set cluster.cpu=4` arrives as a YAML number; Kubernetes writes quantities as text.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value

    def resolved_image(self) -> str:
        """``image`` or the runtime image; raises KubetrainError if neither is set."""
        from kubetrain.launch.image import runtime_image

        image = self.image or runtime_image()
        if not image or not image.strip():
            raise KubetrainError(
                "cluster.image is not set (and KUBETRAIN_IMAGE is empty): set cluster.image to "
                "the kubetrain runtime image your cluster can pull"
            )
        return image


class JobConfig(TrainingConfig):
    """What a launcher reads: the training run and where it runs (``cluster``)."""

    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig, description=(ClusterConfig.__doc__ or "").split("\n")[0]
    )

    @model_validator(mode="after")
    def _one_process_per_gpu(self) -> JobConfig:
        gpus = self.cluster.num_gpus
        if gpus and self.train.nproc != gpus:
            raise ValueError(
                f"train.nproc ({self.train.nproc}) must equal cluster.num_gpus ({gpus}): "
                "one process per GPU"
            )
        return self
