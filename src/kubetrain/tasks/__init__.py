"""The kinds of data kubetrain trains on, behind one interface (``kubetrain.tasks.base``).

``open_workload(cfg, data)`` gives the workload of a dataset artifact; ``build_dataset(cfg,
out_dir)`` is the preprocess step for the kind that ``cfg.data`` describes. Each kind lives in
its own module, imported on first use (torchvision and tokenizers only where needed).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubetrain.core.artifacts import DatasetArtifact
    from kubetrain.data.config import DataConfig
    from kubetrain.pipeline.config import PipelineConfig
    from kubetrain.tasks.base import Workload
    from kubetrain.tune.config import TuneConfig

# kind -> "module:Workload class"; the module also has ``build(cfg.data, out_dir) -> meta``.
KINDS: dict[str, str] = {
    "tabular": "kubetrain.tasks.tabular:TabularWorkload",
    "images": "kubetrain.tasks.images:ImageWorkload",
    "text_classification": "kubetrain.tasks.text:TextClassificationWorkload",
    "seq2seq": "kubetrain.tasks.text:Seq2SeqWorkload",
}


def _resolve(kind: str) -> tuple[Any, type[Workload]]:
    from kubetrain.core.errors import DataError

    if kind not in KINDS:
        raise DataError(f"data error: dataset kind {kind!r} unknown (known: {', '.join(KINDS)})")
    module_name, cls_name = KINDS[kind].split(":")
    module = importlib.import_module(module_name)
    return module, getattr(module, cls_name)


def objective_name(tune: TuneConfig, kind: str) -> str:
    """What the search objective is for a dataset of ``kind``: ``val_loss``, or ``val_<metric>``
    with the metric the kind's workload validates on (``val_accuracy`` is the key trials
    report it under, whatever the metric: accuracy for classification, the workload's own for
    other tasks)."""
    if tune.objective_metric == "val_loss":
        return "val_loss"
    if kind not in KINDS:
        return tune.objective_metric
    return f"val_{_resolve(kind)[1].metric}"


def open_workload(cfg: PipelineConfig, data: DatasetArtifact) -> Workload:
    """The workload of the dataset artifact ``data``, with the pipeline config ``cfg``."""
    return _resolve(data.kind)[1](cfg, data)


def kind_of(cfg: DataConfig) -> str:
    """Which kind of dataset ``cfg`` describes (what preprocess builds)."""
    if cfg.task != "classification":
        return cfg.task
    from kubetrain.tasks.images import is_image_source

    if is_image_source(cfg):
        return "images"
    return "tabular"


def build_dataset(cfg: DataConfig, out_dir: str | Path) -> dict[str, Any]:
    """Preprocess: the dataset artifact of ``cfg`` in ``out_dir``; returns its meta."""
    module, _ = _resolve(kind_of(cfg))
    return module.build(cfg, Path(out_dir))


def preflight(cfg: PipelineConfig) -> None:
    """The checks a kind can make before anything is written (its module's ``preflight``,
    if it has one); raises ConfigError or DataError."""
    module, _ = _resolve(kind_of(cfg.data))
    check = getattr(module, "preflight", None)
    if check is not None:
        check(cfg)


def workload_for_model(dataset_dir: str | Path, model_dir: str | Path) -> Workload:
    """The workload of a dataset artifact as the model in ``model_dir`` was trained on it: with
    the data and model settings recorded in its spec (eval transforms, tokenizer use, ...), so
    quantize and evaluate read the data exactly as training did."""
    from kubetrain.core.artifacts import DatasetArtifact, TrainedModel
    from kubetrain.pipeline.config import PipelineConfig

    data = DatasetArtifact.load(dataset_dir)
    spec = TrainedModel.load(model_dir).spec
    cfg = PipelineConfig.model_validate(
        {"data": spec.get("data_config") or data.meta.get("config") or {},
         "model": spec.get("config") or {}, "evaluate": spec.get("evaluate") or {}}
    )  # fmt: skip
    return open_workload(cfg, data)
