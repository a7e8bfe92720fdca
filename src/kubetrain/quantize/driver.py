"""The quantize step's driver: build, measure, gate and publish (see ``kubetrain.quantize``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from kubetrain.core.artifacts import (
    MODEL_WEIGHTS,
    DatasetArtifact,
    QuantizedModel,
    TrainedModel,
)
from kubetrain.core.errors import KubetrainError
from kubetrain.core.records import Candidate, QuantInfo
from kubetrain.models.networks import build_from_spec
from kubetrain.quantize import artifact, select
from kubetrain.quantize.candidates import Tried, attempt, measure_against
from kubetrain.quantize.config import QAT, QuantizeConfig
from kubetrain.tasks.base import Task

if TYPE_CHECKING:
    from kubetrain.tasks.config import ScoringConfig
    from kubetrain.tasks.detection import DetectionTask

log = logging.getLogger(__name__)


def load_model(model_dir: str | Path, task: Task | None = None) -> nn.Module:
    """Rebuild the fp32 network of a model artifact and load its weights (eval mode).

    Args:
        model_dir: the train step's model artifact.
        task: the task the model was trained with (``task_for_model``); its
            ``build_model`` rebuilds the network (text models need the dataset's tokenizer
            sizes); without one, ``build_from_spec`` does (tabular and image models).

    Raises:
        KubetrainError: ``model_dir`` is not a model artifact.
    """
    trained = TrainedModel.load(model_dir)
    if task is not None and task.kind != "tabular":
        # As build_from_spec: the initial weights are not read again (the trained ones replace
        # them, and this process may not reach that file).
        cfg = task.cfg.model.model_copy(update={"weights": None, "freeze_backbone": False})
        model = task.build_model(cfg)
    else:
        model = build_from_spec(trained.spec)
    model.load_state_dict(torch.load(trained.weights, weights_only=True))
    return model.eval()


def load_quantized(
    qdir: str | Path, model_dir: str | Path | None = None, task: Task | None = None
) -> nn.Module:
    """The runnable model of a quantized artifact (needs torch, and torchao for its ops).

    An int8 state dict (``format: state_dict``, Transformers whose decoding calls methods
    beyond ``forward``) is loaded into the fp32 network rebuilt from ``model_dir`` (with
    ``task``, see ``load_model``) and quantized the same way; the other formats need
    neither.

    Raises:
        KubetrainError: ``qdir`` is not a quantized artifact, or a state dict without
            ``model_dir``.
    """
    qdir = Path(qdir)
    info = QuantizedModel.load(qdir).info
    if info.format == "detector":  # kubetrain.quantize.detection: applied to the fp32 detector
        from kubetrain.quantize.detection import load_detector

        if model_dir is None:
            raise KubetrainError(f"{qdir}: an int8 detector: rebuilding it needs the fp32 model")
        return load_detector(qdir, load_model(model_dir, task))
    if info.format == artifact.STATE_DICT_FORMAT:
        if model_dir is None:
            raise KubetrainError(f"{qdir}: an int8 state dict: rebuilding it needs the fp32 model")
        return artifact.load_state_dict_artifact(qdir, load_model(model_dir, task))
    return artifact.load_artifact(qdir)[0]


def quantize_artifact(
    model_dir: str | Path,
    dataset_dir: str | Path,
    out_dir: str | Path,
    qcfg: QuantizeConfig,
    task: Task | None = None,
    scoring: ScoringConfig | None = None,
) -> QuantInfo:
    """Quantize the model in ``model_dir`` as ``qcfg`` says into ``out_dir``; returns quant.json.

    Args:
        model_dir: the train step's model artifact.
        dataset_dir: its dataset artifact (calibration: train split; the gate: val split).
        out_dir: where the quantized artifact is written.
        qcfg: the quantize section.
        task: the task to read the data and score with (default: the model's,
            ``task_for_model``).
        scoring: how the evaluate step will score (its metric, beam size, decode length), for
            the gate to measure the same way; default: what the model was trained with.

    Raises:
        KubetrainError: no int8 model is within ``max_accuracy_drop`` (on the task's
            primary metric) and ``on_drop`` is ``fail`` (the message has every candidate's
            numbers), or an explicit method failed.
        ConfigError: the explicit method does not apply to the model (e.g. static_int8 for a
            text model).
    """
    threads = torch.get_num_threads()
    if qcfg.num_threads:
        torch.set_num_threads(qcfg.num_threads)
    try:
        if scoring is not None:
            from kubetrain.tasks import task_for_model

            task = (task or task_for_model(dataset_dir, model_dir)).measure_as(scoring)
        if task is None and DatasetArtifact.read_meta(dataset_dir).kind == "detection":
            from kubetrain.tasks import task_for_model

            task = task_for_model(dataset_dir, model_dir)
        if task is not None and task.kind == "detection":
            from kubetrain.quantize.detection import quantize_detector

            return quantize_detector(
                Path(model_dir), Path(out_dir), qcfg, cast("DetectionTask", task), load_model
            )
        return _quantize(Path(model_dir), Path(dataset_dir), Path(out_dir), qcfg, task)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Reference:
    """The fp32 model and what each candidate is built from and measured against."""

    model: nn.Module
    model_dir: Path
    task: Task
    x_train: np.ndarray  # the training samples calibration and QAT use (qcfg.qat_samples)
    y_train: np.ndarray
    qcfg: QuantizeConfig
    work: Path  # candidates are built here
    metric: str  # the task's primary metric (accuracy, bleu, ...): what the gate is on
    accuracy: float  # fp32 validation score on ``metric``
    info: Candidate  # the fp32 model exported like a candidate: size, file, latency

    @property
    def shape(self) -> list[int]:
        return self.task.data.input_shape

    @property
    def token_inputs(self) -> bool:
        """The model takes token ids (a text model): Linear-layer int8, saved as a state dict."""
        return not torch.from_numpy(self.x_train[:1]).is_floating_point()

    def val_score(self, model: nn.Module) -> float:
        return self.task.score(model, "val").values[self.metric]


def _reference(
    model_dir: Path, dataset_dir: Path, out_dir: Path, qcfg: QuantizeConfig,
    task: Task | None,
) -> _Reference:  # fmt: skip
    from kubetrain.quantize import methods
    from kubetrain.tasks import task_for_model

    task = task or task_for_model(dataset_dir, model_dir)
    model = load_model(model_dir, task)
    x_train, y_train = task.examples("train", qcfg.qat_samples, seed=qcfg.seed)
    work = out_dir / "candidates"
    scores = task.score(model, "val")
    fp32 = methods.fp32_program(model, x_train[:64], work / "none_fp32")
    fp32.metric, fp32.val_metric = scores.metric, scores.value
    measure_against(fp32, fp32, scores.value)  # the reference: drop 0, size 1x
    return _Reference(
        model=model,
        model_dir=model_dir,
        task=task,
        x_train=x_train.numpy(),
        y_train=y_train.numpy(),
        qcfg=qcfg,
        work=work,
        metric=scores.metric,
        accuracy=scores.value,
        info=fp32,
    )


def _candidate_names(qcfg: QuantizeConfig, token_inputs: bool = False) -> list[str]:
    """What to try first: ``auto``'s candidates that apply to the model, cheapest first, or
    the one named method.

    Raises:
        ConfigError: the named method does not apply to the model (one line: why).
    """
    from kubetrain.core.errors import ConfigError
    from kubetrain.quantize import methods

    if qcfg.method == "none":
        return []
    if qcfg.method == "auto":
        names = [n for n in methods.CHEAP_FIRST if n in qcfg.auto_candidates]
        skipped = [n for n in names if methods.not_applicable(n, token_inputs)]
        if skipped:
            log.info("quantize: auto skips %s (not for a text model)", ", ".join(skipped))
        kept = [n for n in names if n not in skipped]
        if not kept:
            raise ConfigError(
                "config error: quantize.auto_candidates: none applies to a text model (use "
                f"{', '.join(methods.TOKEN_METHODS)})"
            )
        return kept
    name = methods.candidate_for(qcfg.method, qcfg)
    why = methods.not_applicable(name, token_inputs)
    if why:
        raise ConfigError(f"config error: quantize.method: {why}")
    return [name]


def _attempt(ref: _Reference, name: str) -> Tried:
    """Build candidate ``name``, reload it from its saved artifact and measure it (see
    ``candidates.attempt``: under ``auto`` a failure is recorded, not raised)."""
    from kubetrain.quantize import methods

    cdir = ref.work / name.replace("/", "_")

    def build() -> tuple[Candidate, nn.Module, float]:
        if ref.token_inputs:
            info = methods.build_state_dict(name, ref.model, ref.qcfg, cdir)
            fresh = load_model(ref.model_dir, ref.task)
            runnable, _ = artifact.load_artifact(cdir, fresh)  # measure what was saved
        else:
            info = methods.build(
                name, ref.model, ref.x_train, ref.y_train, ref.shape, ref.qcfg, cdir
            )
            runnable, _ = artifact.load_artifact(cdir)  # measure what was saved
        return info, runnable, ref.val_score(runnable)

    return attempt(name, cdir, ref.qcfg, ref.info, build)


def _try_candidates(ref: _Reference, names: list[str]) -> list[Tried]:
    """Every candidate of ``names``, then QAT if none is within budget (``qat_on_drop``)."""
    tried = [_attempt(ref, n) for n in names]
    budget = ref.qcfg.max_accuracy_drop
    if (
        names
        and ref.qcfg.qat_on_drop
        and QAT not in names
        and not any(select.within_budget(t.info, budget) for t in tried)
    ):
        log.info("no post-training int8 model within %.4f: trying QAT", budget)
        tried.append(_attempt(ref, QAT))
    return tried


# The batch sizes every candidate is timed at (Candidate has a field per size).
LATENCY_BATCHES = (1, 64)


def _measure_latency(ref: _Reference, tried: list[Tried]) -> None:
    """Batch-1 and batch-64 latency of fp32 and every built candidate, timed side by side;
    written into the candidates' infos and ``ref.info``."""
    from kubetrain.tasks.measure import compare_latency, latency_inputs

    built = {t.info.name: t.model for t in tried if t.model is not None}
    if not built:
        return
    fp32_name = "none/fp32"
    runs = {fp32_name: ref.model, **built}
    x_val, y_val = ref.task.examples("val", 64, seed=ref.qcfg.seed)
    inputs = latency_inputs(x_val, y_val, ref.task.data.kind)
    timed = [t.info for t in tried if t.info.name in built]
    for batch in LATENCY_BATCHES:
        lat = compare_latency(runs, inputs, None, batch, ref.qcfg.latency_repeats)
        for c in timed:
            setattr(c, f"latency_ms_b{batch}", lat[c.name]["median"])
            setattr(c, f"latency_ms_b{batch}_min", lat[c.name]["min"])
            setattr(c, f"latency_ms_b{batch}_max", lat[c.name]["max"])
        setattr(ref.info, f"latency_ms_b{batch}", lat[fp32_name]["median"])
        tokens = lat[fp32_name]["tokens"]
        if tokens:  # a text model: token positions per second too
            for c in [ref.info, *timed]:
                ms = c.latency_ms(batch) or float("inf")
                setattr(c, f"tokens_per_second_b{batch}", tokens * 1e3 / ms)
    fp32_b1, fp32_b64 = ref.info.latency_ms_b1 or 1.0, ref.info.latency_ms_b64 or 1.0
    for c in timed:
        b1, b64 = c.latency_ms_b1 or 0.0, c.latency_ms_b64 or 0.0
        c.latency_ratio_b64, c.latency_ratio_b1 = b64 / fp32_b64, b1 / fp32_b1
        c.samples_per_second_b64 = 64e3 / b64
    ref.info.samples_per_second_b64 = 64e3 / fp32_b64


def _quantize(
    model_dir: Path, dataset_dir: Path, out_dir: Path, qcfg: QuantizeConfig,
    task: Task | None,
) -> QuantInfo:  # fmt: skip
    started = time.perf_counter()
    ref = _reference(model_dir, dataset_dir, out_dir, qcfg, task)
    names = _candidate_names(qcfg, ref.token_inputs)
    tried = _try_candidates(ref, names)
    _measure_latency(ref, tried)
    candidates = [t.info for t in tried]
    none = None if names else "quantize.method none"
    chosen, decision = select.decide(candidates, qcfg, ref.metric, ref.accuracy, none=none)
    log.info("quantize: %s", decision)
    chosen_dir = next((t.dir for t in tried if t.info is chosen), ref.work / "none_fp32")
    fp32 = ref.info
    info = artifact.publish(
        out_dir, chosen_dir, chosen or fp32, fp32, candidates, qcfg, decision,
        gate_passed=chosen is not None or not names,
        fp32_state_dict_bytes=(model_dir / MODEL_WEIGHTS).stat().st_size,
        started=started, work=ref.work,
    )  # fmt: skip
    return info
