"""The kinds of data kubetrain trains on, behind one interface (``kubetrain.tasks.base``).

``open_task(cfg, data)`` gives the task of a dataset artifact; ``build_dataset(cfg,
out_dir)`` is the preprocess step for the kind that ``cfg.data`` describes. Each kind lives in
its own module, imported on first use (torchvision and tokenizers only where needed).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubetrain.core.artifacts import DatasetArtifact
    from kubetrain.core.records import DatasetMeta
    from kubetrain.data.config import DataConfig
    from kubetrain.tasks.base import Task
    from kubetrain.tasks.config import TaskConfig

# kind -> "module:Task class"; the module also has ``build(cfg.data, out_dir) -> meta``.
KINDS: dict[str, str] = {
    "tabular": "kubetrain.tasks.tabular:TabularTask",
    "images": "kubetrain.tasks.images:ImageTask",
    "text_classification": "kubetrain.tasks.text:TextClassificationTask",
    "seq2seq": "kubetrain.tasks.text:Seq2SeqTask",
    "detection": "kubetrain.tasks.detection:DetectionTask",
}


def _resolve(kind: str) -> tuple[Any, type[Task]]:
    from kubetrain.core.errors import DataError

    if kind not in KINDS:
        raise DataError(f"data error: dataset kind {kind!r} unknown (known: {', '.join(KINDS)})")
    module_name, cls_name = KINDS[kind].split(":")
    module = importlib.import_module(module_name)
    return module, getattr(module, cls_name)


def metric_of(kind: str) -> str:
    """The metric the task of ``kind`` validates on (what ``Task.validate`` returns beside the
    loss: ``accuracy`` for classification, a kind's own otherwise)."""
    return _resolve(kind)[1].metric


def open_task(cfg: TaskConfig, data: DatasetArtifact) -> Task:
    """The task of the dataset artifact ``data``, read as ``cfg`` says (any config extending
    ``TaskConfig``: a training run's, the pipeline's)."""
    return _resolve(data.kind)[1](cfg, data)


def declared_kind(cfg: DataConfig) -> str | None:
    """The kind of dataset ``cfg`` says it is, without looking at the data: ``data.kind``, or
    ``data.task`` for a text kind; None for ``classification`` with ``data.kind: auto`` (tabular
    or images: ``kind_of`` finds out). What compiling a pipeline may use: it never reads data."""
    if cfg.kind != "auto":
        return cfg.kind
    if cfg.task != "classification":
        return cfg.task
    return None


def kind_of(cfg: DataConfig) -> str:
    """Which kind of dataset ``cfg`` describes (what preprocess builds): the declared kind, or
    for ``data.kind: auto`` classification, images or tabular from a look at the source (its
    name, one listing or one header: ``kubetrain.tasks.images.is_image_source``). Only steps
    that read the data anyway call it, never compiling.

    Raises:
        ConfigError, DataError: the source is in object storage that cannot be read (no
            credentials, no endpoint, no bucket: ``kubetrain.data.storage``).
    """
    declared = declared_kind(cfg)
    if declared is not None:
        return declared
    from kubetrain.data.storage import storage_errors
    from kubetrain.tasks.images import is_image_source

    with storage_errors(cfg.source, cfg.storage_options):
        if is_image_source(cfg):
            return "images"
    return "tabular"


def build_dataset(cfg: DataConfig, out_dir: str | Path) -> DatasetMeta:
    """Preprocess: the dataset artifact of ``cfg`` in ``out_dir``; returns its meta.

    Raises:
        ConfigError, DataError: the kind's own, and object storage that cannot be read.
    """
    from kubetrain.data.storage import storage_errors

    module, _ = _resolve(kind_of(cfg))
    with storage_errors(cfg.source, cfg.storage_options):
        return module.build(cfg, Path(out_dir))


def preflight(cfg: DataConfig) -> None:
    """The checks a kind can make before anything is written (its module's ``preflight``,
    if it has one); raises ConfigError or DataError."""
    from kubetrain.data.storage import storage_errors

    module, _ = _resolve(kind_of(cfg))
    check = getattr(module, "preflight", None)
    if check is not None:
        with storage_errors(cfg.source, cfg.storage_options):
            check(cfg)


def check_model(cfg: TaskConfig, data: DatasetArtifact) -> None:
    """Build ``cfg.model`` for the dataset artifact ``data`` once, on the CPU, and run it on two
    examples (``Task.check_model``): before training or a search starts its workers.

    Raises:
        ConfigError: the model cannot be built or does not fit the data, naming model.name.
    """
    open_task(cfg, data).check_model(cfg.model)


def task_for_model(dataset_dir: str | Path, model_dir: str | Path) -> Task:
    """The task of a dataset artifact as the model in ``model_dir`` was trained on it: with
    the data and model settings recorded in its spec (eval transforms, tokenizer use, ...), so
    quantize and evaluate read the data exactly as training did."""
    from kubetrain.core.artifacts import DatasetArtifact, TrainedModel
    from kubetrain.tasks.config import TaskConfig

    data = DatasetArtifact.load(dataset_dir)
    spec = TrainedModel.load(model_dir).spec
    cfg = TaskConfig.model_validate(
        {"data": spec.data_config, "model": spec.config, "evaluate": spec.evaluate or {}}
    )
    return open_task(cfg, data)
