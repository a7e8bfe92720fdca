"""Every artifact one step hands the next: its files, a dataclass for what it holds, and
``load`` / ``save`` / ``is_complete`` for each.

    artifact         written by   files (the last one written marks the artifact complete)
    DatasetArtifact  preprocess   data.npz, meta.json
    PlanArtifact     preprocess-plan     the kind's plan files, plan.json
    PartArtifact     preprocess-convert  shards, part.json
    SearchResult     tune         trials.json, [report.html], best_params.json
    TrainedModel     train        model.pt, history.json, metrics.json, model.json
    QuantizedModel   quantize     model.pt2, model.ts or model_state.pt, quant.json
    Evaluation       evaluate     details.json, report.html, metrics.json
    Promotion        promote      fp32/, int8/, promotion.json
    Rejection        reject       decision.json

The file names below are the only place they are spelled; what the JSON files hold is typed in
``kubetrain.core.records``. Writes are atomic and the marker file comes last, so ``is_complete``
is true only for a finished artifact. Importing this is cheap (no numpy, no torch at module
level): the KFP components and the CLI read artifacts through it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kubetrain.core.errors import DataError, KubetrainError
from kubetrain.core.io import atomic_write, read_json, write_json
from kubetrain.core.records import (
    DatasetMeta,
    DatasetPart,
    EpochStats,
    ModelSpec,
    PreprocessPlan,
    QuantInfo,
    SearchSummary,
    TrainSummary,
    Trial,
    dataset_meta,
)

if TYPE_CHECKING:
    import numpy as np

M = TypeVar("M", bound=DatasetMeta)

# -- file names ---------------------------------------------------------------------------------
DATASET_ARRAYS = "data.npz"
DATASET_META = "meta.json"
PREPROCESS_PLAN = "plan.json"
PREPROCESS_PART = "part.json"
SEARCH_RESULT = "best_params.json"
SEARCH_TRIALS = "trials.json"
SEARCH_REPORT = "report.html"
MODEL_WEIGHTS = "model.pt"
MODEL_SPEC = "model.json"
MODEL_HISTORY = "history.json"
MODEL_METRICS = "metrics.json"
QUANT_INFO = "quant.json"
QUANT_PROGRAM = "model.pt2"
QUANT_SCRIPT = "model.ts"
QUANT_STATE_DICT = "model_state.pt"
EVAL_METRICS = "metrics.json"
EVAL_DETAILS = "details.json"
EVAL_REPORT = "report.html"
PROMOTION_RECORD = "promotion.json"
PROMOTED_FP32 = "fp32"
PROMOTED_INT8 = "int8"
REJECTION_RECORD = "decision.json"
# The registry's record of the last promotion (kubetrain.registry), beside models/<key>/.
REGISTRY_RECORD = "promoted.json"
# What `kubetrain run` leaves at the top of a run directory (copies of the evaluation's), and
# the file that marks a directory as a run's (kubetrain run writes into such a directory only).
RUN_METRICS = "metrics.json"
RUN_REPORT = "report.html"
RUN_MARKER = ".kubetrain-run"


# -- dataset ------------------------------------------------------------------------------------
SPLITS = ("train", "val", "test")


@dataclass
class DatasetArtifact:
    """The preprocess step's output: ``meta.json`` (its kind's ``DatasetMeta``) and the data:
    for tabular data the arrays ``x_train y_train x_val y_val x_test y_test`` (float32
    features, int64 class ids) in ``data.npz``, for the streamed kinds shards beside
    ``meta.json`` or at ``meta.root``."""

    path: Path
    meta: DatasetMeta
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.meta.version

    @property
    def kind(self) -> str:
        """``tabular`` (arrays in ``data.npz``) or a streamed kind (``images``, the text tasks:
        shards beside ``meta.json``, or at ``meta.root``); see ``kubetrain.tasks``."""
        return self.meta.kind

    @property
    def root(self) -> str:
        """Where a streamed kind's shards are: ``meta.root`` (e.g. an ``s3://`` URI the shards
        were published to) or the artifact's own directory."""
        return self.meta.root or str(self.path)

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes or [])

    @property
    def input_shape(self) -> list[int]:
        return self.meta.input_shape

    @property
    def num_classes(self) -> int:
        return len(self.meta.classes or [])

    def meta_of(self, kind: type[M]) -> M:
        """``meta`` as the record of its kind (``ImageMeta``, ...).

        Raises:
            DataError: the dataset is of another kind.
        """
        if not isinstance(self.meta, kind):
            raise DataError(
                f"data error: {self.path}: a {self.kind} dataset, not {kind.__name__}'s kind"
            )
        return self.meta

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of split ``name`` (train, val or test); tabular datasets only."""
        if self.kind != "tabular":
            raise DataError(f"data error: {self.path}: a {self.kind} dataset has no arrays")
        return self.arrays[f"x_{name}"], self.arrays[f"y_{name}"]

    def save(self, directory: str | Path) -> None:
        """Write the arrays, then ``meta.json`` (its presence marks a complete artifact)."""
        import numpy as np

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)

        def write_arrays(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **self.arrays)  # type: ignore[arg-type]  # numpy's stub: bool

        if self.arrays:
            atomic_write(out / DATASET_ARRAYS, write_arrays)
        self.write_meta(out, self.meta)

    @staticmethod
    def write_meta(directory: str | Path, meta: DatasetMeta) -> None:
        """Write ``meta.json``: the last file of a dataset artifact (it marks it complete)."""
        meta.write(Path(directory) / DATASET_META)

    @staticmethod
    def is_complete(directory: str | Path) -> bool:
        """``meta.json`` is written last: a streamed kind is complete with it; a tabular one
        needs its arrays too."""
        path = Path(directory)
        if not (path / DATASET_META).is_file():
            return False
        if (path / DATASET_ARRAYS).is_file():
            return True
        try:
            return read_json(path / DATASET_META).get("kind", "tabular") != "tabular"
        except (ValueError, AttributeError):
            return False

    @classmethod
    def read_meta(cls, directory: str | Path) -> DatasetMeta:
        """Only ``meta.json`` (no arrays); raises DataError if ``directory`` is no dataset."""
        path = Path(directory)
        if not cls.is_complete(path):
            raise DataError(
                f"data error: {path}: not a kubetrain dataset (no {DATASET_META}/{DATASET_ARRAYS})"
            )
        try:
            data = read_json(path / DATASET_META)
        except ValueError as err:  # a damaged artifact: one line, not a traceback
            raise DataError(f"data error: {path / DATASET_META}: not valid JSON ({err})") from None
        try:
            return dataset_meta(data, path / DATASET_META)
        except KubetrainError as err:
            raise DataError(f"data error: {err}") from None

    @classmethod
    def load(cls, directory: str | Path) -> DatasetArtifact:
        """Load a dataset artifact; raises DataError if ``directory`` is not one."""
        import numpy as np

        path = Path(directory)
        meta = cls.read_meta(path)
        if meta.kind != "tabular":
            return cls(path=path, meta=meta)
        import zipfile

        try:
            with np.load(path / DATASET_ARRAYS, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"data error: {path / DATASET_ARRAYS}: unreadable ({first})") from None
        return cls(path=path, meta=meta, arrays=arrays)


def load_dataset(path: str | Path) -> DatasetArtifact:
    """``DatasetArtifact.load``: the dataset in ``path``; raises DataError if it is not one."""
    return DatasetArtifact.load(path)


# -- preprocessing fanned out: the plan and the parts -------------------------------------------
@dataclass
class PlanArtifact:
    """The preprocess-plan step's output: the kind's own plan files (an image listing, a
    tokenizer) and ``plan.json`` last (``PreprocessPlan``: the shards and each convert task's
    range of them)."""

    path: Path
    plan: PreprocessPlan

    def save(self) -> None:
        """Write ``plan.json`` (the kind's files are written first, by its planner)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.plan.write(self.path / PREPROCESS_PLAN)

    @staticmethod
    def is_complete(directory: str | Path) -> bool:
        return (Path(directory) / PREPROCESS_PLAN).is_file()

    @classmethod
    def load(cls, directory: str | Path) -> PlanArtifact:
        """Raises DataError if ``directory`` holds no complete plan."""
        path = Path(directory)
        if not cls.is_complete(path):
            raise DataError(f"data error: {path}: no preprocess plan ({PREPROCESS_PLAN})")
        try:
            return cls(path, PreprocessPlan.read(path / PREPROCESS_PLAN))
        except KubetrainError as err:
            raise DataError(f"data error: {err}") from None


@dataclass
class PartArtifact:
    """A preprocess-convert step's output: the shards of its range (unless they went to
    ``data.shard_store``) and ``part.json`` last (``DatasetPart``)."""

    path: Path
    part: DatasetPart

    @property
    def root(self) -> str:
        """Where this part's shards are."""
        return self.part.root or str(self.path)

    def save(self) -> None:
        """Write ``part.json``, after the shards: it marks the part complete."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.part.write(self.path / PREPROCESS_PART)

    @staticmethod
    def is_complete(directory: str | Path) -> bool:
        return (Path(directory) / PREPROCESS_PART).is_file()

    @classmethod
    def load(cls, directory: str | Path) -> PartArtifact | None:
        """The part in ``directory``, or None if it is not complete (a convert task that did not
        finish). Raises DataError if ``part.json`` is not one."""
        path = Path(directory)
        if not cls.is_complete(path):
            return None
        try:
            return cls(path, DatasetPart.read(path / PREPROCESS_PART))
        except KubetrainError as err:
            raise DataError(f"data error: {err}") from None


# -- search result ------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """The tune step's output: the best parameters (dotted config keys, in ``summary``: the
    ``best_params.json`` record) and every trial (``trials.json``)."""

    summary: SearchSummary
    trials: list[Trial] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.summary.enabled

    @property
    def best_params(self) -> dict[str, Any]:
        return self.summary.best_params

    @classmethod
    def disabled(cls) -> SearchResult:
        """What a step without a search hands on: no parameters to change."""
        return cls(SearchSummary.disabled())

    def save(self, directory: str | Path, report_html: str | None = None) -> None:
        """Write trials (and the report), then ``best_params.json`` (marks it complete)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / SEARCH_TRIALS, [t.to_json() for t in self.trials])
        if report_html is not None:
            atomic_write(out / SEARCH_REPORT, lambda tmp: Path(tmp).write_text(report_html))
        self.summary.write(out / SEARCH_RESULT)

    @staticmethod
    def is_complete(directory: str | Path) -> bool:
        return (Path(directory) / SEARCH_RESULT).is_file()

    @classmethod
    def load(cls, directory: str | Path | None) -> SearchResult:
        """The search in ``directory``; no directory: the result of a disabled search."""
        if directory is None:
            return cls.disabled()
        path = Path(directory)
        if not cls.is_complete(path):
            raise KubetrainError(f"{path}: not a kubetrain search result (no {SEARCH_RESULT})")
        trials_file = path / SEARCH_TRIALS
        trials = read_json(trials_file) if trials_file.is_file() else []
        return cls(
            SearchSummary.read(path / SEARCH_RESULT),
            [Trial.parse(t, trials_file) for t in trials],
        )

    @staticmethod
    def best_params_file(directory: str | Path) -> Path:
        """Where the best parameters of a search artifact are (what train reads)."""
        return Path(directory) / SEARCH_RESULT


# -- trained model ------------------------------------------------------------------------------
@dataclass
class TrainedModel:
    """The train step's output: fp32 weights and how to rebuild and judge them.

    ``spec``: model.json (the network, and the dataset and sections it was trained with).
    ``history``: one ``EpochStats`` per epoch. ``summary``: metrics.json, the run's totals.
    ``state_dict`` is only set on save; ``load`` leaves the weights on disk (``weights``).
    """

    path: Path | None
    spec: ModelSpec
    history: list[EpochStats]
    summary: TrainSummary
    state_dict: dict[str, Any] | None = None

    @property
    def weights(self) -> Path:
        if self.path is None:
            raise KubetrainError("this model has not been saved")
        return self.path / MODEL_WEIGHTS

    def save(self, directory: str | Path) -> None:
        """Write weights, history and metrics, then ``model.json`` (marks it complete)."""
        import torch

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.state_dict is not None:
            state = self.state_dict
            atomic_write(out / MODEL_WEIGHTS, lambda tmp: torch.save(state, tmp))
        write_json(out / MODEL_HISTORY, [s.to_json() for s in self.history])
        self.summary.write(out / MODEL_METRICS)
        self.spec.write(out / MODEL_SPEC)
        self.path = out

    @staticmethod
    def is_complete(directory: str | Path) -> bool:
        return (Path(directory) / MODEL_SPEC).is_file()

    @classmethod
    def load(cls, directory: str | Path) -> TrainedModel:
        """The model artifact's JSON parts (the weights stay in ``weights``)."""
        path = Path(directory)
        if not cls.is_complete(path):
            raise KubetrainError(f"{path}: not a kubetrain model (no {MODEL_SPEC})")
        history = path / MODEL_HISTORY
        return cls(
            path=path,
            spec=ModelSpec.read(path / MODEL_SPEC),
            history=[EpochStats.parse(s, history) for s in read_json(history)],
            summary=TrainSummary.read(path / MODEL_METRICS),
        )

    @staticmethod
    def load_summary(directory: str | Path) -> TrainSummary:
        """Only metrics.json (what the train step reports)."""
        return TrainSummary.read(Path(directory) / MODEL_METRICS)


# -- quantized model ----------------------------------------------------------------------------
@dataclass
class QuantizedModel:
    """The quantize step's output: one runnable program and ``quant.json`` (``info``: how to run
    it, what was kept and why, the fp32 reference and every candidate tried).
    ``kubetrain.quantize.artifact`` reloads the program."""

    path: Path
    info: QuantInfo

    @property
    def method(self) -> str | None:
        return self.info.method

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def decision(self) -> str:
        return self.info.decision

    @property
    def program(self) -> Path:
        return self.path / (self.info.file or "")

    def save(self, directory: str | Path) -> None:
        """Write ``quant.json`` (after the program file: it marks the artifact complete)."""
        self.path = Path(directory)
        self.info.write(self.path / QUANT_INFO)

    @staticmethod
    def is_complete(directory: str | Path) -> bool:
        return (Path(directory) / QUANT_INFO).is_file()

    @classmethod
    def load(cls, directory: str | Path) -> QuantizedModel:
        path = Path(directory)
        if not cls.is_complete(path):
            raise KubetrainError(f"{path}: not a kubetrain quantized model (no {QUANT_INFO})")
        return cls(path=path, info=QuantInfo.read(path / QUANT_INFO))


# -- evaluation ---------------------------------------------------------------------------------
@dataclass
class Scores:
    """A model's results on one split (``Task.score``; the evaluation's on the test split).

    ``values`` holds the primary metric ``metric`` and every other result of the task:
    classification ``accuracy``, ``per_class_accuracy``, ``confusion_matrix`` (and
    ``top5_accuracy`` for images, ``macro_f1`` for text); seq2seq ``bleu``, ``rouge_l`` and the
    copy-the-source baselines ``copy_baseline_bleu``, ``copy_baseline_rouge_l`` (all 0-1).
    ``samples`` were scored in ``seconds``: ``samples_per_second`` (read back from a
    metrics.json, only it is known).
    """

    metric: str
    values: dict[str, Any]
    # A few predictions beside their references, for the report.
    examples: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    samples_per_second: float | None = None

    def __post_init__(self) -> None:
        if self.samples_per_second is None and self.seconds > 0:
            self.samples_per_second = self.samples / self.seconds

    @property
    def value(self) -> float:
        """The primary metric."""
        return float(self.values[self.metric])

    @property
    def accuracy(self) -> float | None:
        return self.values.get("accuracy")

    @property
    def per_class_accuracy(self) -> dict[str, float | None] | None:
        return self.values.get("per_class_accuracy")

    @property
    def confusion_matrix(self) -> list[list[int]] | None:
        return self.values.get("confusion_matrix")

    def scalars(self) -> dict[str, float]:
        """Every single-number result (not the per-class ones), primary metric first."""
        out = {self.metric: self.value}
        for k, v in self.values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in out:
                out[k] = v
        return out


@dataclass
class Latency:
    """Median forward-pass time of fp32 and int8 at one batch size, timed in turns."""

    batch_size: int
    fp32_ms: float
    int8_ms: float
    tokens: int = 0  # token positions per batch (text models; 0 for features and images)

    @property
    def ratio(self) -> float:
        """int8 time as a multiple of fp32 time (below 1: int8 is faster)."""
        return self.int8_ms / self.fp32_ms

    def samples_per_second(self, model: str) -> float:
        return self.batch_size * 1e3 / (self.fp32_ms if model == "fp32" else self.int8_ms)

    def tokens_per_second(self, model: str) -> float:
        return self.tokens * 1e3 / (self.fp32_ms if model == "fp32" else self.int8_ms)


@dataclass
class Sizes:
    """Bytes of the fp32 and int8 models: weights of like artifacts (both exported the same
    way) and whole files (for a small model mostly the serialized graph)."""

    weights_fp32: int
    weights_int8: int
    file_fp32: int
    file_int8: int
    state_dict_fp32: int

    @property
    def ratio(self) -> float:
        return self.weights_int8 / self.weights_fp32


@dataclass
class TrainEfficiency:
    """What training cost, from the model's metrics.json (``kubetrain.train.loop``)."""

    seconds: float
    step_seconds: float
    samples_per_second: float
    data_wait_share: float
    world_size: int
    ranks_identical: bool
    epochs: int
    precision: str | None = None
    mfu: float | None = None
    flops_per_sample: float | None = None
    compute_share: float | None = None
    optimizer_share: float | None = None
    comm_seconds: float | None = None
    allreduce_calls: int | None = None
    cpu_percent: float | None = None
    peak_rss_mib: float | None = None
    rank_cpu_percent: list[float] | None = None
    rank_peak_rss_mib: list[float] | None = None
    gpu_peak_mib: float | None = None
    checkpoint_seconds: float | None = None
    checkpoints_written: int | None = None
    compile_seconds: float | None = None
    resumed_from_step: int | None = None
    restarts: int | None = None

    @classmethod
    def from_summary(cls, summary: TrainSummary) -> TrainEfficiency:
        """From a model's metrics.json (its ``train_seconds`` is ``seconds`` here)."""
        values = summary.model_dump()
        values["seconds"] = values["train_seconds"]
        return cls(**{f.name: values[f.name] for f in fields(cls)})


# Per quantize candidate, the measurements copied into metrics.json (as quant_<name>_<field>).
CANDIDATE_METRICS = (
    "val_accuracy", "val_metric", "size_bytes", "latency_ms_b1", "latency_ms_b64",
    "samples_per_second_b64", "tokens_per_second_b1", "tokens_per_second_b64",
)  # fmt: skip


# Seq2seq: the copy-the-source baseline scores, reported once (they do not depend on the model).
_BASELINE_PREFIX = "copy_baseline_"


@dataclass
class Evaluation:
    """The evaluate step's output: fp32 vs int8 on the test split, what training and
    quantization cost, the search that chose the parameters, and the promotion verdict.

    The verdict is on the primary metric (``fp32.metric``: accuracy, BLEU, ...): both models
    reach ``min_value``, and for seq2seq (``beat_copy_baseline``) both beat copying the source.
    ``to_metrics()`` flattens it into metrics.json (the keys the README documents and
    ``kubetrain run`` prints), ``to_details()`` into details.json; ``load`` reverses both.
    """

    fp32: Scores
    int8: Scores
    latency: list[Latency]
    latency_threads: int
    sizes: Sizes
    train: TrainEfficiency
    quantization: QuantInfo  # the quantized model's quant.json
    search: SearchResult
    history: list[EpochStats]  # the model's per-epoch stats
    classes: list[str] | None
    dataset_version: str
    test_samples: int
    min_value: float
    kind: str = "tabular"
    beat_copy_baseline: bool = True

    @property
    def metric(self) -> str:
        return self.fp32.metric

    @property
    def metric_drop(self) -> float:
        return self.fp32.value - self.int8.value

    @property
    def accuracy_drop(self) -> float:
        return self.metric_drop

    @property
    def copy_baseline(self) -> float | None:
        """Seq2seq: the primary metric of copying the source (None for other tasks)."""
        return self.fp32.values.get(_BASELINE_PREFIX + self.metric)

    @property
    def promoted(self) -> bool:
        """The promotion rule (``is_promotable`` on ``to_metrics()``)."""
        return is_promotable(self.to_metrics(promoted=False), self.min_value)

    @property
    def is_classification(self) -> bool:
        return self.fp32.accuracy is not None

    def to_metrics(self, promoted: bool = True) -> dict[str, Any]:
        """The flat metrics.json, keys in their documented order."""
        metric = self.metric
        m: dict[str, Any] = {
            f"test_{metric}_fp32": self.fp32.value,
            f"test_{metric}_int8": self.int8.value,
        }
        for lat in self.latency:
            m[f"latency_ms_b{lat.batch_size}_fp32"] = lat.fp32_ms
            m[f"latency_ms_b{lat.batch_size}_int8"] = lat.int8_ms
        m.update(self._size_metrics())
        m[f"{metric}_drop_int8"] = self.metric_drop
        m.update(self._speed_metrics())
        m.update(self._quantize_metrics())
        train = asdict(self.train)
        for f in fields(TrainEfficiency):
            m[f"train_{f.name}"] = train[f.name]
        m.update(dataset_version=self.dataset_version, test_samples=self.test_samples)
        if self.is_classification:
            m["min_accuracy"] = self.min_value  # the bar's classification name
        if self.search.enabled:
            m["tune_trials"] = self.search.summary.trials_total
            m["tune_best_value"] = self.search.summary.best_value
        # The primary metric, the bar, the other results of both models, scoring throughput.
        m.update(metric=metric, min_value=self.min_value, dataset_kind=self.kind)
        m.update(self._other_results())
        if self.copy_baseline is not None:
            m["beat_copy_baseline"] = self.beat_copy_baseline
        m["promoted"] = is_promotable(m, self.min_value) if promoted else False
        return m

    def _size_metrics(self) -> dict[str, Any]:
        s = self.sizes
        return {
            "model_size_bytes_fp32": s.weights_fp32,
            "model_size_bytes_int8": s.weights_int8,
            "model_file_bytes_fp32": s.file_fp32,
            "model_file_bytes_int8": s.file_int8,
            "model_state_dict_bytes_fp32": s.state_dict_fp32,
            "size_ratio_int8": s.ratio,
        }

    def _speed_metrics(self) -> dict[str, Any]:
        """Per latency batch size: int8/fp32 time, samples/s and (text) tokens/s of both."""
        m: dict[str, Any] = {}
        for lat in self.latency:
            b = lat.batch_size
            m[f"latency_ratio_b{b}_int8"] = lat.ratio
            m[f"samples_per_second_b{b}_fp32"] = lat.samples_per_second("fp32")
            m[f"samples_per_second_b{b}_int8"] = lat.samples_per_second("int8")
            if lat.tokens:
                m[f"latency_tokens_b{b}"] = lat.tokens
                m[f"tokens_per_second_b{b}_fp32"] = lat.tokens_per_second("fp32")
                m[f"tokens_per_second_b{b}_int8"] = lat.tokens_per_second("int8")
        return m

    def _quantize_metrics(self) -> dict[str, Any]:
        """Every candidate's measurements (``quant_<name>_<field>``) and what was kept."""
        m: dict[str, Any] = {}
        for c in self.quantization.candidates:
            key = c.name.replace("/", "_")
            for name in CANDIDATE_METRICS:
                if getattr(c, name) is not None:
                    m[f"quant_{key}_{name}"] = getattr(c, name)
        q = self.quantization
        m.update(
            quantize_method=q.method,
            quantize_candidate=q.name,
            quantize_runtime=q.runtime,
            quantize_decision=q.decision,
            latency_threads=self.latency_threads,
        )
        return m

    def _other_results(self) -> dict[str, Any]:
        """Both models' results beside the primary metric (a baseline once), and their
        scoring throughput."""
        m: dict[str, Any] = {}
        for name, scores in (("fp32", self.fp32), ("int8", self.int8)):
            for key, value in scores.scalars().items():
                if key == self.metric:
                    continue
                if key.startswith(_BASELINE_PREFIX):
                    m.setdefault(key, value)  # the same for both models: once
                else:
                    m[f"test_{key}_{name}"] = value
            m[f"test_samples_per_second_{name}"] = scores.samples_per_second
        return m

    def to_details(self) -> dict[str, Any]:
        """details.json: all results of both models (per class ones included), examples, the
        training history, the search and quantization."""
        return {
            "kind": self.kind,
            "metric": self.metric,
            "classes": self.classes,
            "per_class_accuracy": self.fp32.per_class_accuracy,
            "confusion_matrix": self.fp32.confusion_matrix,
            "per_class_accuracy_int8": self.int8.per_class_accuracy,
            "confusion_matrix_int8": self.int8.confusion_matrix,
            "values_fp32": self.fp32.values,
            "values_int8": self.int8.values,
            "examples_fp32": self.fp32.examples,
            "examples_int8": self.int8.examples,
            "history": [s.to_json() for s in self.history],
            "tuning": self.search.summary.to_json(),
            "quantization": self.quantization.to_json(),
            "trials": [t.to_json() for t in self.search.trials],
        }

    def save(self, directory: str | Path, report_html: str) -> None:
        """Write details.json and the report, then metrics.json (marks it complete)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / EVAL_DETAILS, self.to_details())
        atomic_write(out / EVAL_REPORT, lambda tmp: Path(tmp).write_text(report_html))
        write_json(out / EVAL_METRICS, self.to_metrics())

    @staticmethod
    def is_complete(directory: str | Path) -> bool:
        return (Path(directory) / EVAL_METRICS).is_file()

    @staticmethod
    def load_metrics(directory: str | Path) -> dict[str, Any]:
        """Only metrics.json (what the gate and ``kubetrain run`` read)."""
        path = Path(directory)
        if not Evaluation.is_complete(path):
            raise KubetrainError(f"{path}: not a kubetrain evaluation (no {EVAL_METRICS})")
        return read_json(path / EVAL_METRICS)

    @classmethod
    def load(cls, directory: str | Path) -> Evaluation:
        """The evaluation in ``directory`` (metrics.json and details.json)."""
        path = Path(directory)
        m = cls.load_metrics(path)
        details = path / EVAL_DETAILS
        d = read_json(details)
        metric = m["metric"]

        def scores(name: str) -> Scores:
            return Scores(
                metric, d[f"values_{name}"], d[f"examples_{name}"],
                samples_per_second=m.get(f"test_samples_per_second_{name}"),
            )  # fmt: skip

        search = SearchResult(
            SearchSummary.parse(d["tuning"], details),
            [Trial.parse(trial, details) for trial in d["trials"]],
        )
        return cls(
            fp32=scores("fp32"),
            int8=scores("int8"),
            latency=_latencies(m),
            latency_threads=m["latency_threads"],
            sizes=Sizes(
                m["model_size_bytes_fp32"],
                m["model_size_bytes_int8"],
                m["model_file_bytes_fp32"],
                m["model_file_bytes_int8"],
                m["model_state_dict_bytes_fp32"],
            ),
            train=TrainEfficiency(**_train_fields(m)),
            quantization=QuantInfo.parse(d["quantization"], details),
            search=search,
            history=[EpochStats.parse(s, details) for s in d["history"]],
            classes=d["classes"],
            dataset_version=m["dataset_version"],
            test_samples=m["test_samples"],
            min_value=m["min_value"],
            kind=m["dataset_kind"],
            beat_copy_baseline=m.get("beat_copy_baseline", True),
        )


def _latencies(metrics: dict[str, Any]) -> list[Latency]:
    """The latency rows of a metrics.json, one per batch size it was measured at."""
    batches = [int(b) for b in re.findall(r"latency_ms_b(\d+)_fp32", " ".join(metrics))]
    return [
        Latency(
            b,
            metrics[f"latency_ms_b{b}_fp32"],
            metrics[f"latency_ms_b{b}_int8"],
            metrics.get(f"latency_tokens_b{b}", 0),
        )
        for b in batches
    ]


def _train_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    """``TrainEfficiency``'s fields from a metrics.json (``train_<field>`` keys)."""
    return {f.name: metrics.get(f"train_{f.name}") for f in fields(TrainEfficiency)}


def primary_values(metrics: dict[str, Any]) -> tuple[str, float, float]:
    """``(metric, fp32 value, int8 value)`` of a metrics.json."""
    metric = metrics["metric"]
    return metric, metrics[f"test_{metric}_fp32"], metrics[f"test_{metric}_int8"]


def is_promotable(metrics: dict[str, Any], min_value: float) -> bool:
    """The promotion rule on a metrics.json: both the fp32 and the int8 model reach the bar
    ``min_value`` on the primary metric; for seq2seq with ``beat_copy_baseline`` both are also
    above the score of copying the source."""
    metric, fp32, int8 = primary_values(metrics)
    if min(fp32, int8) < min_value:
        return False
    baseline = metrics.get(_BASELINE_PREFIX + metric)
    if baseline is not None and metrics.get("beat_copy_baseline", True):
        return min(fp32, int8) > baseline
    return True


def gate_reason(metrics: dict[str, Any], min_value: float) -> str:
    """One line: why a metrics.json does or does not clear the bar ``min_value``."""
    metric, fp32, int8 = primary_values(metrics)
    line = f"test {metric} fp32 {fp32:.4f} / int8 {int8:.4f}"
    baseline = metrics.get(_BASELINE_PREFIX + metric)
    if min(fp32, int8) < min_value:
        return f"{line} below the bar {min_value:.4f}"
    if (
        baseline is not None
        and metrics.get("beat_copy_baseline", True)
        and min(fp32, int8) <= baseline
    ):
        return f"{line} not above copying the source ({baseline:.4f})"
    return f"{line} clears the bar {min_value:.4f}"


# -- promotion ----------------------------------------------------------------------------------
@dataclass
class Promotion:
    """The promote step's output: ``fp32/`` and ``int8/`` (copies of the model artifacts) and
    ``promotion.json``; with a registry also where it was published and under which key."""

    dataset_version: str
    # Classification: accuracy and its bar (as before); other tasks leave them None.
    test_accuracy_fp32: float | None = None
    test_accuracy_int8: float | None = None
    min_accuracy: float | None = None
    promoted: bool = True
    fingerprint: str | None = None  # the registry's model-inputs key (kubetrain.registry)
    model_uri: str | None = None
    promoted_at: str | None = None
    # The primary metric (accuracy, bleu, ...), both models' values and the bar.
    metric: str | None = None
    test_value_fp32: float | None = None
    test_value_int8: float | None = None
    min_value: float | None = None

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any]) -> Promotion:
        metric, fp32, int8 = primary_values(metrics)
        return cls(
            dataset_version=metrics["dataset_version"],
            test_accuracy_fp32=metrics.get("test_accuracy_fp32"),
            test_accuracy_int8=metrics.get("test_accuracy_int8"),
            min_accuracy=metrics.get("min_accuracy"),
            metric=metric,
            test_value_fp32=fp32,
            test_value_int8=int8,
            min_value=metrics.get("min_value", metrics.get("min_accuracy")),
        )

    def to_record(self) -> dict[str, Any]:
        """promotion.json: the set fields, ``promoted`` first."""
        record = {"promoted": self.promoted, **asdict(self)}
        return {k: v for k, v in record.items() if v is not None}

    def save(self, directory: str | Path) -> None:
        write_json(Path(directory) / PROMOTION_RECORD, self.to_record())

    @staticmethod
    def is_complete(directory: str | Path) -> bool:
        return (Path(directory) / PROMOTION_RECORD).is_file()

    @classmethod
    def load(cls, directory: str | Path) -> Promotion:
        return cls(**read_json(Path(directory) / PROMOTION_RECORD))


@dataclass
class Rejection:
    """The reject step's output: ``decision.json``, why the model was not promoted."""

    reason: str
    promoted: bool = False

    def save(self, directory: str | Path) -> None:
        write_json(Path(directory) / REJECTION_RECORD, {"promoted": False, "reason": self.reason})

    @staticmethod
    def is_complete(directory: str | Path) -> bool:
        return (Path(directory) / REJECTION_RECORD).is_file()

    @classmethod
    def load(cls, directory: str | Path) -> Rejection:
        return cls(**read_json(Path(directory) / REJECTION_RECORD))
