"""The ``cluster`` config section: where the heavy steps run and how their pods look.

The patterns are Kubernetes' own: DNS-1123 names and resource quantities, checked here so that
a typo fails at config time, not when the API server refuses the object.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kubetrain.core.config import Section
from kubetrain.core.errors import KubetrainError
from kubetrain.train.config import TrainingConfig

# Kubernetes names: a DNS-1123 label (namespaces, name prefixes) or subdomain (claims, ...).
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A resource quantity as Kubernetes writes it: "2", "500m", "1.5", "4Gi", "512M".
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


class Toleration(Section):
    """One pod toleration (Kubernetes ``tolerations`` entry), e.g. for tainted GPU nodes."""

    key: str = Field("", description="Taint key to tolerate; empty with Exists: every taint.")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal or Exists.")
    value: str = Field("", description="Taint value (operator Equal).")
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = Field(
        "", description="Taint effect to tolerate; empty: all effects."
    )


class ClusterConfig(Section):
    """Where the heavy steps run, and how their pods look on Kubernetes.

    On ``kubernetes`` the dataset, checkpoints and model travel through one PersistentVolumeClaim
    (``pvc_name``) that the launching step and every job pod mount at ``mount_path``: the
    launcher copies the dataset artifact to ``<mount_path>/jobs/<job>/dataset``, the job writes
    ``.../model`` (and ``.../checkpoints``), and the launcher copies the model back.
    """

    backend: Literal["local", "kubernetes"] = Field(
        "local", description="local: torchrun processes and Optuna; kubernetes: PyTorchJob/Katib."
    )
    namespace: str = Field(
        "kubeflow", pattern=_DNS_LABEL, description="Namespace of the PyTorchJobs/Experiments."
    )
    image: str | None = Field(
        None,
        min_length=1,
        pattern=r"^\S+$",
        description="Image of the steps and job pods; unset: kubetrain.launch.image.runtime_image() "
        "(KUBETRAIN_IMAGE or the runtime image of this version).",
    )
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field(
        "IfNotPresent", description="Pull policy of the job pods' image."
    )
    service_account: str = Field(
        "", description="Service account of the job pods; empty: the namespace's default."
    )
    name_prefix: str = Field(
        "kubetrain",
        max_length=30,
        pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
        description="Prefix of the PyTorchJob/Experiment names (a random suffix follows).",
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
        description="Add an elasticPolicy (c10d rendezvous, torchrun restarts). The node count "
        "stays train.nnodes: the global batch is fixed by train.batch_size.",
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
