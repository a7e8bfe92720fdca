"""The kinds of data kubetrain trains on, behind one interface (``kubetrain.tasks.base``).

``open_task(cfg, data)`` gives the task of a dataset artifact; ``build_dataset(cfg,
out_dir)`` is the preprocess step for the kind that ``cfg.data`` describes. Each kind lives in
its own module, imported on first use (torchvision and tokenizers only where needed).

Preprocess fanned out over tasks (``data.parallel_tasks``, see ``kubetrain.data.fanout``) is
``plan_dataset`` -> ``convert_range`` x N -> ``merge_dataset``. A kind takes part by giving its
module three functions beside ``build``:

    plan(cfg, plan_dir, num_tasks) -> PreprocessPlan     its files into plan_dir; the record
    convert(cfg, plan_dir, plan, task, root) -> DatasetPart   task's range of shards into root
    merge(cfg, plan_dir, plan, results, parts, root, out) -> DatasetMeta   manifest, stats, meta

A kind without them (tabular data) is built whole by the merge task; its convert tasks have
nothing to do.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubetrain.core.artifacts import DatasetArtifact
    from kubetrain.core.records import DatasetMeta, DatasetPart, PreprocessPlan
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


def shard_root(cfg: DataConfig, plan: PreprocessPlan) -> str | None:
    """Where the convert tasks of ``plan`` write their shards when ``data.shard_store`` is set
    (``<store>/<kind>-<input fingerprint>``: a re-run of the same input writes the same place);
    None: into their own output artifacts."""
    if not cfg.shard_store or plan.whole:
        return None
    return f"{cfg.shard_store.rstrip('/')}/{plan.kind}-{plan.fingerprint}"


def plan_dataset(cfg: DataConfig, plan_dir: str | Path, num_tasks: int) -> PreprocessPlan:
    """The plan task: list the source, draw the split, fix every shard and each of the
    ``num_tasks`` convert tasks' range of them; writes the plan artifact into ``plan_dir``.

    Raises:
        ConfigError, DataError: the kind's own (bad source, too few samples to split, ...).
    """
    import time

    from kubetrain.core.artifacts import PlanArtifact
    from kubetrain.data.fanout import whole_plan
    from kubetrain.data.storage import storage_errors

    started = time.perf_counter()
    kind = kind_of(cfg)
    module, _ = _resolve(kind)
    out = Path(plan_dir)
    out.mkdir(parents=True, exist_ok=True)
    planner = getattr(module, "plan", None)
    with storage_errors(cfg.source, cfg.storage_options):
        plan = planner(cfg, out, num_tasks) if planner else whole_plan(kind, cfg.source, num_tasks)
    seconds = round(time.perf_counter() - started, 3)
    plan = plan.model_copy(update={"seconds": seconds, "config": cfg.model_dump(mode="json")})
    PlanArtifact(out, plan).save()
    return plan


def plan_config(plan: PreprocessPlan) -> DataConfig:
    """The data section a plan was made with (what its convert tasks and merge read)."""
    from kubetrain.data.config import DataConfig

    return DataConfig.model_validate(plan.config)


def convert_range(plan_dir: str | Path, task: int, out_dir: str | Path) -> DatasetPart:
    """Convert task ``task`` (0-based): its range of the plan's shards into ``out_dir`` (or the
    shard store), then ``part.json`` there; with the data section the plan was made with.

    Raises:
        DataError: the plan is missing or unreadable, ``task`` is not one of its tasks, or the
            kind's conversion fails.
    """
    from kubetrain.core.artifacts import PartArtifact, PlanArtifact
    from kubetrain.core.records import DatasetPart
    from kubetrain.data.fanout import task_slots
    from kubetrain.data.storage import storage_errors

    plan = PlanArtifact.load(plan_dir).plan
    cfg = plan_config(plan)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = shard_root(cfg, plan)
    slots = task_slots(plan, task)
    if plan.whole or not slots:
        part = DatasetPart(kind=plan.kind, fingerprint=plan.fingerprint, task=task, slots=[])
    else:
        module, _ = _resolve(plan.kind)
        try:
            with storage_errors(cfg.source, cfg.storage_options):
                part = module.convert(cfg, Path(plan_dir), plan, task, root or str(out))
        except BaseException:
            # A range half written is no range (and on a full disk, what keeps it full).
            _remove_slots(root or str(out), [plan.slots[i].name for i in slots], cfg)
            raise
    part = part.model_copy(update={"root": root})
    PartArtifact(out, part).save()
    return part


def merge_dataset(
    plan_dir: str | Path, part_dirs: list[str | Path], out_dir: str | Path
) -> DatasetMeta:
    """The merge task: check that every convert task's range is there, bring the shards into
    ``out_dir`` (unless they are in the shard store), write the manifest, the statistics
    combined from the parts and ``meta.json`` (last); with the data section the plan was made
    with.

    Raises:
        DataError: a range is missing (one line naming it), a part is another plan's, or the
            kind's own checks fail (nothing decodes, ...); ``out_dir`` is left empty.
    """
    from kubetrain.core.artifacts import PartArtifact, PlanArtifact
    from kubetrain.core.io import empty_directory
    from kubetrain.data.fanout import gather, ordered_results
    from kubetrain.data.storage import storage_errors

    plan = PlanArtifact.load(plan_dir).plan
    cfg = plan_config(plan)
    module, _ = _resolve(plan.kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plan.whole:
        return module.build(cfg, out)
    parts: dict[int, PartArtifact] = {}
    for directory in part_dirs:
        found = PartArtifact.load(directory)  # None: a task that left no complete part
        if found is not None:
            parts.setdefault(found.part.task, found)
    ordered = ordered_results(plan, [a.part for a in parts.values()])
    root = shard_root(cfg, plan) or str(out)
    was_empty = not any(out.iterdir())
    try:
        with storage_errors(root, cfg.storage_options):
            gather([(r, parts[p.task].root) for r, p in ordered], root, cfg.storage_options)
            results = [r for r, _ in ordered]
            used = [a.part for a in parts.values()]
            return module.merge(cfg, Path(plan_dir), plan, results, used, root, out)
    except BaseException:
        if was_empty:  # half a dataset is no dataset
            empty_directory(out)
        raise


def _remove_slots(root: str, names: list[str], cfg: DataConfig) -> None:
    """Remove the shards ``names`` at ``root`` and the temporary files of their writers."""
    import contextlib
    import posixpath

    import fsspec

    fs, path = fsspec.core.url_to_fs(root, **dict(cfg.storage_options))
    for name in names:
        for target in (name, f".{name}.tmp"):
            with contextlib.suppress(OSError):
                fs.rm(posixpath.join(path.rstrip("/"), target))


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
