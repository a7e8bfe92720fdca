"""One validated configuration tree for the whole pipeline.

Every knob lives here. A YAML file and ``--set a.b=c`` overrides feed the same tree; a mistake is
reported as one line that names the dotted field (``train.lr: Input should be greater than 0``).
"""

from __future__ import annotations

import contextlib
import json
import math
import types
from pathlib import Path
from typing import (  # noqa: UP035 (List: a field is named "list")
    Any,
    ClassVar,
    List,
    Literal,
    Union,
    get_args,
    get_origin,
)

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kubetrain.errors import ConfigError, KubetrainError

# Katib's algorithm names (https://www.kubeflow.org/docs/components/katib/user-guides/hp-tuning/)
# that have a local equivalent in Optuna; see kubetrain.tune.local for the mapping.
KATIB_LOCAL_ALGORITHMS = (
    "random",
    "grid",
    "tpe",
    "multivariate-tpe",
    "cmaes",
    "sobol",
    "bayesianoptimization",
    "hyperband",
)
# Katib algorithms with no local equivalent: named in the error so the user knows why.
KATIB_CLUSTER_ONLY_ALGORITHMS = ("enas", "darts", "pbt")

# Katib algorithmSettings that have a local meaning, per algorithm (see kubetrain.tune.space).
KATIB_ALGORITHM_SETTINGS: dict[str, tuple[str, ...]] = {
    "random": ("random_state",),
    "grid": ("random_state",),
    "tpe": ("random_state", "n_startup_trials", "n_ei_candidates", "n_EI_candidates"),
    "multivariate-tpe": ("random_state", "n_startup_trials", "n_ei_candidates"),
    "cmaes": ("random_state", "sigma", "restart_strategy"),
    "sobol": ("random_state",),
    "bayesianoptimization": ("random_state", "n_initial_points", "base_estimator"),
    "hyperband": ("random_state", "eta", "r_l", "resource_name", "min_resource"),
}

# Quantization candidates as "method/backend" (see kubetrain.quantize).
QUANT_CANDIDATES = (
    "weight_only_int8/torchao",
    "dynamic_int8/torchao",
    "dynamic_int8/fbgemm",
    "static_int8/x86_inductor",
    "qat_int8/x86_inductor",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_quiet_conversions(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse what pydantic would otherwise convert without a word: ``true`` for a number
        (``train.epochs=true`` would train 1 epoch), ``1`` or ``"yes"`` for a switch, and
        inf/nan anywhere (``train.lr=.inf``, a ``.nan`` in a search-space list)."""
        annotation = cls.model_fields[info.field_name].annotation
        kinds = _union_members(annotation)
        if bool in kinds:
            if value is not None and not isinstance(value, bool):
                raise ValueError("Input should be true or false")
        elif isinstance(value, bool) and (int in kinds or float in kinds):
            raise ValueError("Input should be a number, not true/false")
        elif _bool_in_number_list(value, kinds):
            raise ValueError("Input should be a list of numbers, not true/false")
        if not _holds_section(annotation) and _non_finite(value):
            raise ValueError("Input should be a finite number (not inf or nan)")
        return value


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _bool_in_number_list(value: Any, kinds: tuple[Any, ...]) -> bool:
    numbers = any(get_origin(k) is list and get_args(k)[0] in (int, float) for k in kinds)
    return numbers and isinstance(value, list) and any(isinstance(v, bool) for v in value)


def _holds_section(annotation: Any) -> bool:
    """True if values of ``annotation`` are (or contain) config sections: they check their own
    fields, so an error names the field inside."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_section(a) for a in get_args(annotation))


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


class DataConfig(_Section):
    """Where the data comes from and how it is split, normalised and augmented."""

    source: str = Field(
        "digits",
        description="'digits' (scikit-learn's bundled 8x8 digits), or a path/URI (fsspec) to a "
        ".csv, .parquet or .npz file; a glob pattern reads several files in parallel.",
    )
    label_column: str = Field("label", description="Label column of tabular data (CSV/Parquet).")
    image_shape: list[int] | None = Field(
        None,
        description="C,H,W of image data given as flat feature columns (digits sets it itself).",
    )
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of samples for validation.")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of samples for test.")
    normalize: Literal["standard", "minmax", "none"] = Field(
        "standard", description="Per-feature normalisation, fitted on the training split only."
    )
    augment: bool = Field(False, description="Random shifts and noise on image training data.")
    augment_shift: int = Field(1, ge=0, le=8, description="Largest random shift in pixels.")
    augment_noise: float = Field(
        0.05, ge=0, description="Std of Gaussian noise (normalised units)."
    )
    num_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Parallel workers: files read at once in preprocess, DataLoader worker "
        "processes per rank in training (0 = in the main process).",
    )
    prefetch: int = Field(
        4,
        ge=0,
        le=64,
        description="Training batches prepared ahead of the step: by a background thread when "
        "num_workers is 0 (0 = no thread), per worker process otherwise (at least 1).",
    )
    seed: int = Field(0, description="Seed of the train/val/test split.")

    @field_validator("image_shape")
    @classmethod
    def _shape_is_positive(cls, shape: list[int] | None) -> list[int] | None:
        if shape is not None and (not shape or any(v < 1 for v in shape)):
            raise ValueError("every entry must be a positive integer, e.g. [1, 28, 28] (C,H,W)")
        return shape


class ModelConfig(_Section):
    """Which network to train."""

    name: Literal["mlp", "cnn"] = Field("mlp", description="'mlp' or 'cnn' (image data only).")
    hidden_sizes: list[int] = Field(
        default_factory=lambda: [256, 128], description="MLP hidden layer widths."
    )
    channels: list[int] = Field(
        default_factory=lambda: [32, 64], description="CNN convolution channels."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before each hidden layer.")

    @model_validator(mode="after")
    def _positive_sizes(self) -> ModelConfig:
        for field in ("hidden_sizes", "channels"):
            values = getattr(self, field)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{field} must be a non-empty list of positive integers")
        return self


class TrainConfig(_Section):
    """Optimisation and distribution of the training step."""

    epochs: int = Field(20, ge=1, description="Passes over the training split.")
    batch_size: int = Field(
        64, ge=1, description="Global batch: summed over processes, nodes and accumulation."
    )
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    optimizer: Literal["adam", "adamw", "rmsprop", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum of sgd and rmsprop.")
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: int = Field(0, ge=0, description="Linear warm-up before the schedule.")
    step_size: int = Field(10, ge=1, description="Epochs between decays of the step schedule.")
    gamma: float = Field(0.1, gt=0, le=1, description="Decay factor of the step schedule.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per step.")
    max_grad_norm: float | None = Field(None, gt=0, description="Clip gradients to this norm.")
    nproc: int = Field(2, ge=1, le=64, description="Worker processes per node (torchrun).")
    nnodes: int = Field(1, ge=1, le=64, description="Nodes (PyTorchJob replicas; local: agents).")
    num_threads: int = Field(
        0, ge=0, description="torch threads per process; 0 = (CPU cores - 1) / processes, ≥ 1."
    )
    seed: int = Field(0, description="Seed of initialisation, shuffling and augmentation.")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32",
        description="Autocast precision: bf16 (CPU/GPU), fp16 (GPU, with a gradient scaler); "
        "auto = bf16 where the device computes it natively, else fp32.",
    )
    compile: bool = Field(False, description="torch.compile the model (compile time reported).")
    no_sync: bool = Field(
        True, description="Skip the all-reduce on accumulation micro-steps (off only to measure)."
    )
    grad_compression: Literal["none", "bf16", "fp16"] = Field(
        "none", description="Compress gradients for the DDP all-reduce (a DDP comm hook)."
    )
    checkpoint_every_steps: int = Field(
        200, ge=0, description="Optimizer steps between checkpoints (0: only at the end)."
    )
    checkpoint_dir: str | None = Field(
        None, description="Where checkpoints go (default: <model output>/checkpoints)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    resume: bool = Field(
        True, description="Continue from the newest good checkpoint of the same job, if any."
    )
    max_restarts: int = Field(
        0, ge=0, le=100, description="Restarts of the worker group after a failure (torchrun)."
    )

    # Fields that change how a job runs, not what it computes: a checkpoint stays valid and a
    # promoted model stays current across them (batches are global, so nproc/nnodes too).
    RUN_ONLY_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "nproc", "nnodes", "num_threads", "checkpoint_every_steps", "checkpoint_dir",
            "keep_checkpoints", "resume", "max_restarts", "compile", "no_sync",
        }
    )  # fmt: skip

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        parts = self.world_size * self.grad_accum_steps
        if self.batch_size % parts:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by nnodes*nproc*grad_accum_steps "
                f"= {parts}"
            )
        return self


class FeasibleSpace(_Section):
    """Katib's ``feasibleSpace``: a range (min/max/step, distribution) or a list."""

    min: float | None = None
    max: float | None = None
    step: float | None = Field(None, gt=0)
    list: List[Any] | None = None  # noqa: UP006 (a field named "list" shadows the builtin)
    distribution: Literal["uniform", "logUniform"] = "uniform"


class SearchParameter(_Section):
    """One entry of Katib's ``parameters`` list; ``name`` is a dotted config key (``train.lr``)."""

    name: str
    parameterType: Literal["double", "int", "categorical", "discrete"]
    feasibleSpace: FeasibleSpace

    @model_validator(mode="after")
    def _space_matches_type(self) -> SearchParameter:
        space = self.feasibleSpace
        if self.parameterType in ("categorical", "discrete"):
            if not space.list:
                raise ValueError(f"{self.parameterType} parameter needs feasibleSpace.list")
        else:
            if space.min is None or space.max is None or space.min >= space.max:
                raise ValueError("feasibleSpace needs min < max")
            if space.distribution == "logUniform" and space.min <= 0:
                raise ValueError("logUniform needs feasibleSpace.min > 0")
        return self

    def grid_values(self) -> list[Any]:
        """The values Katib's grid algorithm would try (a step is needed for doubles)."""
        space = self.feasibleSpace
        if space.list is not None:
            return list(space.list)
        if self.parameterType == "int":
            step = int(space.step or 1)
            return list(range(int(space.min), int(space.max) + 1, step))
        if space.step is None:
            raise ValueError(
                f"grid search needs feasibleSpace.step for double parameter {self.name}"
            )
        count = math.floor((space.max - space.min) / space.step + 1e-9) + 1
        return [round(space.min + i * space.step, 12) for i in range(count)]


def _default_search_space() -> list[SearchParameter]:
    return [
        SearchParameter(
            name="train.lr",
            parameterType="double",
            feasibleSpace=FeasibleSpace(min=1e-3, max=1e-2, step=3e-3, distribution="logUniform"),
        ),
        SearchParameter(
            name="train.weight_decay",
            parameterType="categorical",
            feasibleSpace=FeasibleSpace(list=[0.0, 1e-4, 1e-3]),
        ),
    ]


class EarlyStopping(_Section):
    """Katib's ``medianstop``: stop a trial below the median of earlier trials at the same step."""

    algorithm: Literal["none", "medianstop"] = "none"
    min_trials_required: int = Field(3, ge=1, description="Completed trials before any stop.")
    start_step: int = Field(2, ge=1, description="Epoch from which trials may be stopped.")


class TuneConfig(_Section):
    """Hyperparameter search over a Katib-shaped ``parameters`` list."""

    enabled: bool = True
    algorithm: str = Field(
        "tpe",
        description="Katib algorithm name: " + ", ".join(KATIB_LOCAL_ALGORITHMS) + " (locally: "
        "Optuna samplers; hyperband: random sampling + Optuna's HyperbandPruner over epochs).",
    )
    algorithm_settings: dict[str, str | int | float] = Field(
        default_factory=dict,
        description="Katib algorithmSettings that map locally (random_state, n_startup_trials, "
        "n_ei_candidates, n_initial_points, sigma, restart_strategy, eta, r_l, resource_name, "
        "min_resource); any other name is rejected.",
    )
    max_trials: int = Field(8, ge=1, description="Trial budget (Katib maxTrialCount).")
    parallel_trials: int = Field(2, ge=1, le=64, description="Trials at once (parallelTrialCount).")
    max_failed_trials: int = Field(
        3, ge=0, description="Failed trials tolerated (maxFailedTrialCount)."
    )
    trial_epochs: int = Field(
        8, ge=1, description="Epochs per trial (shorter than the final train)."
    )
    trial_nproc: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes per trial; > 1 runs each trial as a DDP job of torchrun workers "
        "(a searched train.nproc overrides it).",
    )
    objective_metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    seed: int = Field(0, description="Seed of the search algorithm.")
    parameters: list[SearchParameter] = Field(default_factory=_default_search_space)

    @property
    def goal(self) -> Literal["maximize", "minimize"]:
        return "maximize" if self.objective_metric == "val_accuracy" else "minimize"

    @property
    def epochs_per_trial(self) -> int:
        """Epochs a trial may train: hyperband's ``r_l`` (its maximum resource) or trial_epochs."""
        if self.algorithm == "hyperband" and "r_l" in self.algorithm_settings:
            return int(self.algorithm_settings["r_l"])
        return self.trial_epochs

    @field_validator("algorithm")
    @classmethod
    def _algorithm_has_local_equivalent(cls, algo: str) -> str:
        supported = ", ".join(KATIB_LOCAL_ALGORITHMS)
        if algo in KATIB_CLUSTER_ONLY_ALGORITHMS:
            raise ValueError(
                f"Katib algorithm '{algo}' has no local equivalent; locally supported: {supported}"
            )
        if algo not in KATIB_LOCAL_ALGORITHMS:
            raise ValueError(f"unknown algorithm '{algo}'; locally supported: {supported}")
        return algo

    @field_validator("parameters")
    @classmethod
    def _space_not_empty(
        cls, parameters: list[SearchParameter], info: ValidationInfo
    ) -> list[SearchParameter]:
        # Katib refuses an Experiment without parameters; locally it would run max_trials
        # identical trials. Training without a search is tune.enabled=false.
        if not parameters and info.data.get("enabled", True):
            raise ValueError(
                "an empty search space; add parameters, or set tune.enabled=false to train "
                "without a search"
            )
        return parameters

    @model_validator(mode="after")
    def _settings_map(self) -> TuneConfig:
        algo = self.algorithm
        known = KATIB_ALGORITHM_SETTINGS[algo]
        for name in self.algorithm_settings:
            if name not in known:
                raise ValueError(
                    f"algorithm_settings.{name}: not a setting of '{algo}' here "
                    f"(accepted: {', '.join(known)})"
                )
        if algo == "hyperband" and self.early_stopping.algorithm != "none":
            raise ValueError(
                "hyperband stops trials itself; set early_stopping.algorithm=none with it"
            )
        resource = self.algorithm_settings.get("resource_name")
        if algo == "hyperband" and resource not in (None, "epochs", "train.epochs"):
            raise ValueError(
                f"algorithm_settings.resource_name: '{resource}': locally the hyperband "
                "resource is the trial's epochs (use train.epochs)"
            )
        return self


class QuantizeConfig(_Section):
    """fp32 -> int8, saved as a ``torch.export`` program; an accuracy gate on validation."""

    method: Literal[
        "auto", "dynamic_int8", "weight_only_int8", "static_int8", "qat_int8", "none"
    ] = Field(
        "auto",
        description="auto: try auto_candidates (cheap first), keep the fastest at batch 64 within "
        "max_accuracy_drop; weight_only_int8: int8 weights (torchao); dynamic_int8: int8 weights "
        "and per-batch activation scales (dynamic_backend); static_int8: PT2E post-training "
        "quantization with the x86 inductor quantizer, calibrated on training data; qat_int8: "
        "PT2E quantization-aware fine-tuning (qat_epochs), same int8 scheme as static_int8; "
        "none: keep fp32.",
    )
    dynamic_backend: Literal["torchao", "fbgemm"] = Field(
        "torchao",
        description="Backend of dynamic_int8: torchao (torch.export program, portable) or fbgemm "
        "(torch.ao.quantization.quantize_dynamic, deprecated and x86/ARM-CPU only, saved as "
        "TorchScript; the one dynamic path that is faster than fp32 on AVX2-only CPUs).",
    )
    auto_candidates: list[Literal[QUANT_CANDIDATES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: [
            "weight_only_int8/torchao",
            "dynamic_int8/torchao",
            "dynamic_int8/fbgemm",
            "static_int8/x86_inductor",
        ],
        min_length=1,
        description="What auto tries, in order (method/backend).",
    )
    max_accuracy_drop: float = Field(
        0.005,
        ge=0,
        le=1,
        description="Largest validation-accuracy loss against fp32 that an int8 model may have "
        "(0.005 = half a point).",
    )
    qat_on_drop: bool = Field(
        True, description="If post-training int8 loses too much, try qat_int8 before giving up."
    )
    on_drop: Literal["fail", "keep_fp32"] = Field(
        "fail",
        description="When no int8 model is within max_accuracy_drop: fail with the numbers, or "
        "keep the fp32 model (method none) and say so.",
    )
    reduce_range: bool = Field(
        True,
        description="7-bit activations for static/QAT int8: needed for accuracy on CPUs without "
        "VNNI, whose u8*s8 kernels saturate.",
    )
    calibration_samples: int = Field(
        512,
        ge=1,
        description="Training samples run through static_int8 observers, and that qat_int8 "
        "calibrates and searches its activation ranges on.",
    )
    qat_epochs: int = Field(
        3,
        ge=1,
        description="Fine-tuning epochs of qat_int8; the last one runs with every range frozen.",
    )
    qat_activation_ranges: Literal["search", "minmax"] = Field(
        "search",
        description="Activation ranges of qat_int8. search: from the fp32 min-max of the "
        "calibration samples, shrink each range to the fraction (1 down to 1/4096) whose "
        "fake-quantized output is closest to the fp32 output, and keep it while fine-tuning (so "
        "that an outlier channel that matters little does not cost every other channel its "
        "resolution); minmax: moving-average min-max observers, never clipping.",
    )
    qat_lr: float = Field(1e-4, gt=0, description="Learning rate of the QAT fine-tuning (Adam).")
    qat_batch_size: int = Field(64, ge=1, description="Batch size of the QAT fine-tuning.")
    latency_repeats: int = Field(
        30, ge=3, description="Timed forward passes per candidate and batch size (auto)."
    )
    num_threads: int = Field(
        1,
        ge=0,
        description="torch threads while quantizing and measuring (0 = torch's default); one "
        "thread keeps side-by-side latencies stable on a small shared CPU.",
    )
    seed: int = Field(0, description="Seed of calibration sampling and QAT shuffling.")


class EvaluateConfig(_Section):
    """Accuracy, efficiency and the promotion bar."""

    min_accuracy: float = Field(
        0.9, ge=0, le=1.0, description="Promote only if test accuracy (fp32 and int8) reaches this."
    )
    latency_batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    latency_repeats: int = Field(50, ge=3, description="Timed forward passes per measurement.")


# Kubernetes names: a DNS-1123 label (namespaces, name prefixes) or subdomain (claims, ...).
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A resource quantity as Kubernetes writes it: "2", "500m", "1.5", "4Gi", "512M".
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


class Toleration(_Section):
    """One pod toleration (Kubernetes ``tolerations`` entry), e.g. for tainted GPU nodes."""

    key: str = Field("", description="Taint key to tolerate; empty with Exists: every taint.")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal or Exists.")
    value: str = Field("", description="Taint value (operator Equal).")
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = Field(
        "", description="Taint effect to tolerate; empty: all effects."
    )


class ClusterConfig(_Section):
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
        description="Image of the steps and job pods; unset: kubetrain.images.runtime_image() "
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
    cpu: str = Field("1", pattern=_QUANTITY, description="CPU request of each job pod.")
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
        from kubetrain.images import runtime_image

        image = self.image or runtime_image()
        if not image or not image.strip():
            raise KubetrainError(
                "cluster.image is not set (and KUBETRAIN_IMAGE is empty): set cluster.image to "
                "the kubetrain runtime image your cluster can pull"
            )
        return image


class RetrainConfig(_Section):
    """Scheduled retraining: skip the work when nothing that shapes the model has changed."""

    only_if_changed: bool = Field(
        False,
        description="Fingerprint the dataset and the config; tune/train/quantize/evaluate run "
        "only if the fingerprint differs from the last promoted model's in registry.",
    )
    registry: str = Field(
        "",
        description="Directory or fsspec URI where promoted models are published "
        "(promoted.json + fp32/int8 models); on a cluster, a path under cluster.mount_path. "
        "Empty: promoted models are kept as pipeline artifacts only.",
    )

    @model_validator(mode="after")
    def _registry_needed(self) -> RetrainConfig:
        if self.only_if_changed and not self.registry:
            raise ValueError("only_if_changed needs retrain.registry (where promotions are kept)")
        return self


SECTIONS = ("data", "model", "train", "tune", "quantize", "evaluate", "cluster", "retrain")


class PipelineConfig(_Section):
    """The whole pipeline's configuration."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)

    @model_validator(mode="after")
    def _search_space_names_config(self) -> PipelineConfig:
        dumped = self.model_dump()
        for i, param in enumerate(self.tune.parameters):
            where = f"tune.parameters.{i}.name"
            section = param.name.split(".")[0]
            if section not in ("data", "model", "train", "quantize") or "." not in param.name:
                raise ValueError(
                    f"{where}: '{param.name}' must name a field of data, model, train "
                    "or quantize (e.g. train.lr)"
                )
            try:
                _set_dotted(dumped, param.name, _sample_value(param))
            except ConfigError:
                raise ValueError(f"{where}: '{param.name}' is not a config field") from None
            try:
                type(getattr(self, section)).model_validate(dumped[section])
            except ValidationError as err:
                raise ValueError(f"{where}: '{param.name}': {err.errors()[0]['msg']}") from None
        if self.tune.enabled and self.tune.algorithm == "grid":
            for param in self.tune.parameters:
                param.grid_values()
        gpus = self.cluster.num_gpus
        if gpus and self.train.nproc != gpus:
            raise ValueError(
                f"train.nproc ({self.train.nproc}) must equal cluster.num_gpus ({gpus}): "
                "one process per GPU"
            )
        return self

    def with_params(self, params: dict[str, Any]) -> PipelineConfig:
        """Return a copy with dotted keys (``{"train.lr": 0.01}``) set; raises ConfigError."""
        data = self.model_dump()
        for key, value in params.items():
            _set_dotted(data, key, value)
        return validate_config(data)

    def fingerprint_json(self, *sections: str) -> str:
        """Like ``sections_json``, without the train fields that do not change the result."""
        exclude = {"train": set(TrainConfig.RUN_ONLY_FIELDS)} if "train" in sections else None
        data = self.model_dump(mode="json", include=set(sections), exclude=exclude)
        return json.dumps(data, sort_keys=True)

    def sections_json(self, *sections: str) -> str:
        """JSON of only the named sections: a step's inputs, so caching keys on what it uses."""
        return json.dumps(self.model_dump(mode="json", include=set(sections)), sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _sample_value(param: SearchParameter) -> Any:
    space = param.feasibleSpace
    if space.list:
        return space.list[0]
    return int(space.min) if param.parameterType == "int" else space.min


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"config error: {where}: no such list index")
            part = int(part)  # type: ignore[assignment]
        elif not isinstance(node, dict) or part not in node:
            raise ConfigError(f"config error: {where}: no such field")
        if last:
            node[part] = value
        else:
            node = node[part]


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        given = e.get("input")
        if e["type"] not in ("extra_forbidden", "missing") and not isinstance(given, (dict, list)):
            msg += f" (got {given!r})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "config error: " + "; ".join(parts)


def validate_config(data: Any) -> PipelineConfig:
    """Validate a plain dict into a PipelineConfig; raises ConfigError with the dotted field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config error: the config must be a mapping of sections")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in YAML names the same key twice (PyYAML would keep the last silently)."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key '{key}' on line {line} (first on line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys in a mapping (merge keys ``<<`` allowed)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise DuplicateKeyError(key, line, first[key])
                first[key] = line
            except TypeError:  # an unhashable key: the base constructor says so
                pass
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises DuplicateKeyError for a key given twice in a mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is parsed as a YAML scalar (``1e-3``, ``true``, ``[1, 2]``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"config error: --set {text!r}: expected KEY=VALUE, e.g. train.lr=0.01")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except DuplicateKeyError as err:
        raise ConfigError(f"config error: --set {text!r}: duplicate key '{err.key}'") from None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.strip().lower() not in ("nan", "inf", "-inf"):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads "1e-3" as a string
            value = float(value)
    return key.strip(), value


RECIPES = Path(__file__).parent / "recipes"


def recipes() -> list[str]:
    """Names of the bundled recipes (``--config NAME``): configs for common runs."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    """Load the bundled defaults, then ``path`` (YAML, or the name of a bundled recipe), then
    ``--set`` overrides, and validate.

    Raises ConfigError (one line naming the file or the dotted field) on any problem.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file() and str(path) in recipes():
            path = RECIPES / f"{path}.yaml"
        if path.is_dir():
            raise ConfigError(f"config error: {path}: is a directory, not a YAML config file")
        if not path.is_file():
            raise ConfigError(
                f"config error: {path}: no such file (bundled recipes: {', '.join(recipes())})"
            )
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"config error: {path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                f"offset {err.start}); save the config as UTF-8"
            ) from None
        except OSError as err:
            raise ConfigError(f"config error: {path}: cannot read ({err.strerror})") from None
        try:
            loaded = load_yaml(text)
        except DuplicateKeyError as err:
            raise ConfigError(
                f"config error: {path}:{err.line}: duplicate key '{err.key}' (first on line "
                f"{err.first_line})"
            ) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"config error: {where}: not valid YAML") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config error: {path}: the top level must be a mapping of sections")
        data = loaded or {}
    base = validate_config(data)
    if not overrides:
        return base
    merged = base.model_dump()
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(merged, key, value)
    return validate_config(merged)


def config_from_json(text: str) -> PipelineConfig:
    """Inverse of ``sections_json``: missing sections take their defaults."""
    return validate_config(json.loads(text))
