"""What the artifacts' JSON files hold, as types: one record per payload that travels between
steps, validated when it is read and when it is written (an unknown or missing field is an
error, not a key nobody reads).

    record          file                 written by                read by
    DatasetMeta     meta.json            preprocess (per kind)     every later step
    PreprocessPlan  plan.json            preprocess-plan           preprocess-convert, -merge
    DatasetPart     part.json            preprocess-convert        preprocess-merge
    ModelSpec       model.json           train                     quantize, evaluate, serving
    EpochStats      history.json         train                     evaluate, the report, tracking
    TrainSummary    metrics.json (model) train                     the train component, evaluate
    QuantInfo       quant.json           quantize                  evaluate, the report, promote
    SearchSummary   best_params.json     tune (Optuna or Katib)    train, evaluate, tracking
    Trial           trials.json          tune                      the reports, tracking

``kubetrain.core.artifacts`` owns the files; this module only says what is in them. Importing it
is cheap (pydantic only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubetrain.core.errors import KubetrainError
from kubetrain.core.io import read_json, write_json

R = TypeVar("R", bound="Record")


class Record(BaseModel):
    """A JSON payload of an artifact: its fields are its schema (unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def parse(cls: type[R], data: Any, where: str | Path) -> R:
        """Validate ``data`` (read from ``where``).

        Raises:
            KubetrainError: one line naming ``where`` and the first wrong field.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise KubetrainError(
                f"{where}: not a {cls.__name__} of this kubetrain version: {field}: {first['msg']}"
            ) from None

    @classmethod
    def read(cls: type[R], path: str | Path) -> R:
        """The record in the JSON file ``path``; raises KubetrainError naming the file."""
        try:
            data = read_json(path)
        except (OSError, ValueError) as err:
            raise KubetrainError(f"{path}: cannot read ({err})") from None
        return cls.parse(data, path)

    def write(self, path: str | Path) -> Path:
        """Write the record to ``path`` as JSON (atomically)."""
        return write_json(path, self.to_json())

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON values, fields in their declared order."""
        return self.model_dump(mode="json")


# -- dataset ------------------------------------------------------------------------------------
DATASET_FORMAT_VERSION = 1


class Normalization(Record):
    """How tabular features were scaled: ``(x - shift) / scale`` per feature."""

    kind: str
    shift: list[float]
    scale: list[float]


class DatasetMeta(Record):
    """``meta.json`` of a dataset artifact: what every kind records. A kind's record extends it
    (``DATASET_KINDS``); ``dataset_meta`` reads the right one."""

    format_version: Literal[1] = 1
    kind: str
    version: str = Field(description="Content version: a hash of what a step reads.")
    source: str
    classes: list[str] | None = None
    input_shape: list[int]
    sizes: dict[str, int]
    config: dict[str, Any] = Field(description="The data section it was made with.")
    preprocess_seconds: float = 0.0
    preprocess_tasks: int = Field(1, description="Convert tasks the shards were written by.")
    root: str | None = Field(None, description="Where the shards are, when not beside it.")
    notes: list[str] = Field(
        default_factory=list,
        description="What preprocessing dropped, skipped or cut, one line each (rows, images, "
        "truncated sequences): said on the terminal and in the report.",
    )

    def num_samples(self, split: str) -> int:
        return int(self.sizes.get(split, 0))


class TabularMeta(DatasetMeta):
    """Features in ``data.npz``: normalised arrays of every split."""

    kind: Literal["tabular"] = "tabular"
    files: list[str]
    num_features: int
    class_counts: list[int]
    normalization: Normalization


class ImageMeta(DatasetMeta):
    """Image shards: the model's input after the eval transforms, the training split's
    per-channel statistics, and the per-split class counts."""

    kind: Literal["images"] = "images"
    stored_shape: list[int] | None = None
    image_mode: str
    mean: list[float]
    std: list[float]
    class_counts: dict[str, dict[str, int]]
    num_skipped: int = 0


class TextDatasetMeta(DatasetMeta):
    """Token shards and the tokenizer that made them (``text.json`` has the reader's details)."""

    kind: Literal["text_classification", "seq2seq"]
    tokens: dict[str, int]
    vocab_size: int
    special_ids: dict[str, int]
    max_length: int
    rows: int
    skipped_empty: int
    truncated: int
    tokenize_seconds: float
    tokenize_processes: int
    class_counts: dict[str, int] | None = None


class DetectionMeta(DatasetMeta):
    """Box-annotated image shards (``kubetrain.data.detection``): the categories (their own ids
    and names; labels 1..K are their order), objects per split and class, images without
    objects, and what the box checks kept, clipped and dropped."""

    kind: Literal["detection"] = "detection"
    categories: list[dict[str, Any]] = Field(description="[{id, name}] in id order.")
    image_mode: str
    annotation_format: str
    class_counts: dict[str, dict[str, int]] = Field(description="Objects per split and class.")
    objects: dict[str, int]
    empty_images: dict[str, int]
    boxes: dict[str, Any] = Field(description="kept, clipped, dropped (by reason), examples.")
    num_skipped: int = 0


DATASET_KINDS: dict[str, type[DatasetMeta]] = {
    "tabular": TabularMeta,
    "images": ImageMeta,
    "text_classification": TextDatasetMeta,
    "seq2seq": TextDatasetMeta,
    "detection": DetectionMeta,
}


def dataset_meta(data: Any, where: str | Path) -> DatasetMeta:
    """The ``meta.json`` content ``data`` as its kind's record.

    Raises:
        KubetrainError: an unknown kind or a field that does not fit (one line naming
            ``where``).
    """
    kind = data.get("kind", "tabular") if isinstance(data, dict) else None
    if kind not in DATASET_KINDS:
        raise KubetrainError(
            f"{where}: dataset kind {kind!r} unknown (known: {', '.join(DATASET_KINDS)})"
        )
    return DATASET_KINDS[kind].parse(data, where)


# -- preprocessing fanned out: plan -> convert x N -> merge ---------------------------------------
class ShardSlot(Record):
    """One shard the plan fixes before any is written: its split and number (the file
    ``<split>-<index:06d>.parquet``), the samples planned for it (before images that do not
    decode are dropped) and, for text, the last source row it holds (where a convert task that
    writes it may stop reading)."""

    split: str
    index: int
    samples: int
    last_row: int = -1

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.parquet"


class PreprocessPlan(Record):
    """``plan.json``: what the plan task fixed. The slots are the dataset's shards in manifest
    order (splits, then shard numbers); each convert task writes one contiguous range of them.
    Nothing here depends on the number of tasks but ``ranges``: the shards, and so the dataset,
    are the same for every N."""

    kind: str
    source: str
    fingerprint: str = Field(
        description="The input listing and every setting that shapes the shards."
    )
    num_tasks: int
    slots: list[ShardSlot]
    ranges: list[tuple[int, int]] = Field(description="Per convert task: [first slot, end slot).")
    whole: bool = Field(
        False, description="The kind is built in one task (by merge); convert tasks do nothing."
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="The data section it was made with, the run's overrides applied: what the "
        "convert tasks and merge read (so every task of one preprocess reads the same).",
    )
    seconds: float = 0.0


class ShardRecord(Record):
    """One written shard as the manifest names it (``kubetrain.data.shards.ShardInfo``)."""

    path: str
    num_samples: int
    bytes: int
    sha256: str


class PixelSums(Record):
    """Per-channel sums of pixel values (0..1) and of their squares over some images, in float64:
    partial sums of shards combine, in shard order, into the training split's mean and std
    exactly, however many tasks computed them."""

    sum: list[float]
    squares: list[float]
    pixels: int = Field(description="Pixels per channel summed.")
    images: int

    def plus(self, other: PixelSums) -> PixelSums:
        """These sums and ``other``'s (float64, in this order)."""
        import numpy as np

        return PixelSums(
            sum=(np.asarray(self.sum, np.float64) + np.asarray(other.sum, np.float64)).tolist(),
            squares=(
                np.asarray(self.squares, np.float64) + np.asarray(other.squares, np.float64)
            ).tolist(),
            pixels=self.pixels + other.pixels,
            images=self.images + other.images,
        )


class SlotResult(Record):
    """What a convert task wrote for one slot: the shard (None when every image of it was
    skipped), its class counts (detection: objects), and the parts of the statistics merge
    combines (images: what was skipped, the sizes seen, pixel sums; text: tokens and truncated
    sequences; detection: what was skipped, images without objects, the box checks' counts)."""

    slot: int
    shard: ShardRecord | None
    samples: int = 0
    class_counts: dict[str, int] = Field(default_factory=dict)
    columns: dict[str, str] = Field(default_factory=dict)
    skipped: list[tuple[str, str]] = Field(default_factory=list)
    shapes: list[tuple[int, int]] = Field(default_factory=list)
    pixel_sums: PixelSums | None = None
    tokens: int = 0
    truncated: int = 0
    empty_images: int = 0  # detection: images without objects
    boxes: dict[str, Any] | None = Field(
        None, description="Detection: what the box checks kept, clipped and dropped."
    )


class DatasetPart(Record):
    """``part.json``: one convert task's range of slots, written last (it marks the part
    complete); its shards are beside it, or at ``root`` (``data.shard_store``)."""

    kind: str
    fingerprint: str
    task: int
    slots: list[SlotResult]
    root: str | None = None
    seconds: float = 0.0
    processes: int = 1


# -- model --------------------------------------------------------------------------------------
class TextSpec(Record):
    """What a text network is sized by: the task, the vocabulary and special ids, the length."""

    task: str
    vocab_size: int
    special_ids: dict[str, int]
    max_length: int
    classes: list[str] | None = None


class DetectionSpec(Record):
    """What a detector is sized by: its categories (``num_classes`` counts the background)."""

    classes: list[str]
    categories: list[dict[str, Any]] = Field(description="[{id, name}]: labels 1..K map back.")


class NetworkSpec(Record):
    """What rebuilds a network in another process (``kubetrain.models.build_from_spec``): the
    model section, the input shape and the outputs; for text the vocabulary and how it decodes."""

    config: dict[str, Any] = Field(description="The model section it was built with.")
    input_shape: list[int]
    num_classes: int | None
    text: TextSpec | None = None
    detection: DetectionSpec | None = None
    evaluate: dict[str, Any] | None = Field(
        None, description="Text: the scoring settings it was trained with (decoding)."
    )


class ModelSpec(NetworkSpec):
    """``model.json``: the network and where it came from (dataset, data and train sections)."""

    dataset_version: str
    classes: list[str] | None = None
    data_config: dict[str, Any]
    normalization: Normalization | None = None
    train: dict[str, Any] = Field(description="The train section it was trained with.")


class EpochStats(Record):
    """One epoch of training, over all ranks (``rank_*``: one entry per rank): the trainer's
    history (``history.json``) and what its checkpoints hold (``kubetrain.train.metrics``)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float = Field(description="The task's validation metric (accuracy, BLEU...).")
    lr: float
    samples_per_second: float
    data_wait_share: float
    epoch_seconds: float
    step_seconds: float
    compute_seconds: float = 0.0
    optimizer_seconds: float = 0.0
    data_seconds: float = 0.0
    comm_seconds: float = 0.0
    allreduce_calls: int = 0
    cpu_percent: float = 0.0
    peak_rss_mib: float = 0.0
    gpu_percent: float | None = None
    gpu_peak_mib: float | None = None
    mfu: float | None = None
    rank_cpu_percent: list[float] = Field(default_factory=list)
    rank_peak_rss_mib: list[float] = Field(default_factory=list)
    loss_components: dict[str, float] = Field(
        default_factory=dict,
        description="The training loss's named parts per sample (a detector's classifier, box "
        "regression, objectness ... losses); empty where the loss is one term.",
    )


class TrainSummary(Record):
    """``metrics.json`` of a model artifact: what training did and cost (``kubetrain.train``)."""

    world_size: int
    epochs: int
    steps: int
    samples_seen: int
    train_seconds: float
    wall_seconds: float
    step_seconds: float
    samples_per_second: float
    data_wait_share: float
    compute_share: float
    optimizer_share: float
    comm_seconds: float
    allreduce_calls: int
    cpu_percent: float
    peak_rss_mib: float
    rank_peak_rss_mib: list[float]
    rank_cpu_percent: list[float]
    gpu_peak_mib: float | None = None
    flops_per_sample: float | None = None
    mfu: float | None = None
    precision: str
    compile_seconds: float | None = None
    checkpoints_written: int
    checkpoint_seconds: float
    resumed_from_step: int | None = None
    final_val_accuracy: float
    best_val_accuracy: float
    final_val_loss: float
    parameters: int
    ranks_identical: bool
    # Text: the share of padding in the training batches and the real tokens trained on.
    padding_share: float | None = None
    tokens_seen: int | None = None
    restarts: int = 0
    # On a cluster: which API ran the job and its name (namespace/name).
    training_api: str | None = None
    cluster_job: str | None = None


# -- quantized model ----------------------------------------------------------------------------
class QatStats(Record):
    """What quantization-aware training did (``qat_int8``)."""

    epochs: int
    lr: float
    activation_ranges: dict[str, Any] | None = None
    train_loss: list[float] = Field(default_factory=list, description="Per QAT epoch.")


class Candidate(Record):
    """One quantized model tried (or the fp32 reference): how to run it and what it measured."""

    name: str = Field(description="method/backend, e.g. dynamic_int8/fbgemm.")
    method: str | None = None
    backend: str | None = None
    format: str | None = None
    file: str | None = None
    runtime: str | None = None
    imports: list[str] = Field(default_factory=list)
    size_bytes: int | None = None
    file_bytes: int | None = None
    quantize_seconds: float | None = None
    qat: QatStats | None = None
    metric: str | None = None
    val_metric: float | None = None
    val_accuracy: float | None = None
    accuracy_drop: float | None = None
    size_ratio: float | None = None
    file_ratio: float | None = None
    latency_ms_b1: float | None = None
    latency_ms_b1_min: float | None = None
    latency_ms_b1_max: float | None = None
    latency_ms_b64: float | None = None
    latency_ms_b64_min: float | None = None
    latency_ms_b64_max: float | None = None
    latency_ratio_b1: float | None = None
    latency_ratio_b64: float | None = None
    # A detector's candidates are timed at batch 8 (kubetrain.quantize.detection).
    latency_ms_b8: float | None = None
    latency_ratio_b8: float | None = None
    part: str | None = Field(None, description="A detector: what became int8 (heads, backbone).")
    pad_to: list[int] | None = Field(
        None, description="A detector's int8 backbone: the input size it was exported for."
    )
    out_channels: int | None = Field(None, description="A detector's backbone's out_channels.")
    samples_per_second_b64: float | None = None
    tokens_per_second_b1: float | None = None
    tokens_per_second_b64: float | None = None
    verdict: str | None = Field(None, description="chosen, over budget, slower, ...")
    error: str | None = Field(None, description="Why it could not be built (under auto).")

    def latency_ms(self, batch: int) -> float | None:
        return getattr(self, f"latency_ms_b{batch}", None)


class QuantInfo(Candidate):
    """``quant.json``: the model kept (a candidate's fields), why, the fp32 reference and every
    candidate tried."""

    decision: str = ""
    gate_passed: bool = True
    max_accuracy_drop: float | None = None
    fp32: Candidate | None = None
    fp32_size_bytes: int | None = None
    fp32_file_bytes: int | None = None
    fp32_state_dict_bytes: int | None = None
    candidates: list[Candidate] = Field(default_factory=list)
    threads: int | None = None
    latency_batches: list[int] | None = Field(
        None, description="The batch sizes the candidates were timed at (a detector: 1, 8)."
    )


# -- search -------------------------------------------------------------------------------------
class Trial(Record):
    """One search trial (``trials.json``), from Optuna or from a Katib Trial."""

    number: int
    name: str | None = Field(None, description="Katib: the Trial object's name.")
    state: Literal["complete", "pruned", "fail", "running", "waiting"]
    value: float | None = None
    params: dict[str, Any]
    curve: list[float] = Field(default_factory=list, description="The objective per epoch.")
    seconds: float | None = None
    error: str | None = None
    world_size: int | None = Field(None, description="Processes it trained on.")


class SearchSummary(Record):
    """``best_params.json``: the best parameters (dotted config keys) and how the search went.
    Optuna and Katib write it through this one type."""

    enabled: bool
    best_params: dict[str, Any] = Field(default_factory=dict)
    trials_total: int = 0
    engine: Literal["optuna", "katib"] | None = None
    algorithm: str | None = None
    metric: str | None = None
    objective: str | None = None
    goal: str | None = None
    best_value: float | None = None
    best_trial: int | None = None
    trials_complete: int = 0
    trials_pruned: int = 0
    trials_failed: int = 0
    trials_interrupted: int = Field(0, description="Optuna: trials a stopped run left behind.")
    trial_epochs_total: int | None = Field(
        None, description="Epochs trained over all trials (None where the engine cannot tell)."
    )
    search_seconds: float | None = None
    param_importance: dict[str, float] | None = None
    experiment: str | None = Field(None, description="Katib: namespace/name.")
    training_api: str | None = Field(None, description="Katib: the trials' job kind.")

    @classmethod
    def disabled(cls) -> SearchSummary:
        """What a step without a search hands on: no parameters to change."""
        return cls(enabled=False)


def dumps(record: Record) -> str:
    """The record as compact JSON (a KFP output parameter)."""
    return json.dumps(record.to_json(), sort_keys=True)
