"""The quantize step's driver: build, measure, gate and publish (see ``kubetrain.quantize``)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kubetrain.artifacts import MODEL_WEIGHTS, QUANT_INFO, QuantizedModel, TrainedModel
from kubetrain.errors import KubetrainError
from kubetrain.models.networks import build_from_spec
from kubetrain.quantize import artifact, select
from kubetrain.quantize.config import QAT, QuantizeConfig

log = logging.getLogger(__name__)


def load_model(model_dir: str | Path) -> nn.Module:
    """Rebuild the fp32 network of a model artifact and load its weights (eval mode)."""
    trained = TrainedModel.load(model_dir)
    model = build_from_spec(trained.spec)
    model.load_state_dict(torch.load(trained.weights, weights_only=True))
    return model.eval()


def load_quantized(qdir: str | Path) -> nn.Module:
    """The runnable model of a quantized artifact (needs torch, and torchao for its ops)."""
    return artifact.load_artifact(Path(qdir))[0]


def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, input_shape: list[int]) -> float:
    from kubetrain.evaluate.measure import predict

    return float((predict(model, x, input_shape) == y).mean())


def quantize_artifact(
    model_dir: str | Path, dataset_dir: str | Path, out_dir: str | Path, qcfg: QuantizeConfig
) -> dict[str, Any]:
    """Quantize the model in ``model_dir`` as ``qcfg`` says into ``out_dir``; returns quant.json.

    Raises KubetrainError when no int8 model is within ``max_accuracy_drop`` and
    ``on_drop`` is ``fail`` (the message has every candidate's numbers).
    """
    threads = torch.get_num_threads()
    if qcfg.num_threads:
        torch.set_num_threads(qcfg.num_threads)
    try:
        return _quantize(Path(model_dir), Path(dataset_dir), Path(out_dir), qcfg)
    finally:
        torch.set_num_threads(threads)


def _quantize(model_dir: Path, dataset_dir: Path, out_dir: Path, qcfg: QuantizeConfig) -> dict:
    from kubetrain.data import load_dataset
    from kubetrain.evaluate.measure import compare_latency
    from kubetrain.quantize import methods

    started = time.perf_counter()
    model = load_model(model_dir)
    data = load_dataset(dataset_dir)
    shape = data.input_shape
    x_train, y_train = data.split("train")
    x_val, y_val = data.split("val")
    work = out_dir / "candidates"
    fp32_acc = _accuracy(model, x_val, y_val, shape)
    example = torch.from_numpy(x_train[:64]).view(-1, *shape)
    fp32_info = methods.fp32_program(model, example, work / "none_fp32")
    fp32_size = fp32_info["size_bytes"]

    def attempt(name: str) -> tuple[dict[str, Any], nn.Module | None]:
        cdir = work / name.replace("/", "_")
        try:
            info = methods.build(name, model, x_train, y_train, shape, qcfg, cdir)
            runnable, _ = artifact.load_artifact(cdir)  # measure what was saved
            info["val_accuracy"] = _accuracy(runnable, x_val, y_val, shape)
        except Exception as err:  # one broken backend must not stop auto
            if qcfg.method != "auto":
                raise KubetrainError(
                    f"quantize: {name} failed: {type(err).__name__}: {err}"
                ) from err
            first = (str(err).strip().splitlines() or [""])[0][:200]
            log.warning("quantize: %s failed: %s: %s", name, type(err).__name__, first)
            return {"name": name, "error": f"{type(err).__name__}: {first}"}, None
        info["dir"] = str(cdir)
        info["accuracy_drop"] = fp32_acc - info["val_accuracy"]
        info["size_ratio"] = info["size_bytes"] / fp32_size
        info["file_ratio"] = info["file_bytes"] / fp32_info["file_bytes"]
        log.info("%s: val accuracy %.4f (fp32 %.4f)", name, info["val_accuracy"], fp32_acc)
        return info, runnable

    if qcfg.method == "none":
        names: list[str] = []
    elif qcfg.method == "auto":
        names = [n for n in methods.CHEAP_FIRST if n in qcfg.auto_candidates]
    else:
        names = [methods.candidate_for(qcfg.method, qcfg)]
    tried = [attempt(n) for n in names]
    budget = qcfg.max_accuracy_drop
    if (
        names
        and qcfg.qat_on_drop
        and QAT not in names
        and not any(select.within_budget(c, budget) for c, _ in tried)
    ):
        log.info("no post-training int8 model within %.4f: trying QAT", budget)
        tried.append(attempt(QAT))

    built = {c["name"]: m for c, m in tried if m is not None}
    candidates = [c for c, _ in tried]
    if built:
        fp32_name = "none/fp32"
        runs = {fp32_name: model, **built}
        for batch in (1, 64):
            lat = compare_latency(runs, x_val, shape, batch, qcfg.latency_repeats)
            for c in candidates:
                if c["name"] in lat:
                    c[f"latency_ms_b{batch}"] = lat[c["name"]]["median"]
                    c[f"latency_ms_b{batch}_min"] = lat[c["name"]]["min"]
                    c[f"latency_ms_b{batch}_max"] = lat[c["name"]]["max"]
            fp32_info[f"latency_ms_b{batch}"] = lat[fp32_name]["median"]
        for c in candidates:
            if "latency_ms_b64" in c:
                c["latency_ratio_b64"] = c["latency_ms_b64"] / fp32_info["latency_ms_b64"]
                c["latency_ratio_b1"] = c["latency_ms_b1"] / fp32_info["latency_ms_b1"]
                c["samples_per_second_b64"] = 64e3 / c["latency_ms_b64"]
        fp32_info["samples_per_second_b64"] = 64e3 / fp32_info["latency_ms_b64"]

    chosen = select.choose(candidates, budget)
    select.verdicts(candidates, chosen, budget)
    decision = select.explain(chosen, candidates, budget) if names else "quantize.method none"
    if chosen is None and names:
        if qcfg.on_drop == "fail":
            raise KubetrainError(
                f"quantize: {decision} (fp32 validation accuracy {fp32_acc:.4f}); raise "
                "quantize.max_accuracy_drop or set quantize.on_drop=keep_fp32"
            )
        decision += "; keeping fp32 (quantize.on_drop=keep_fp32)"
    source = Path(chosen["dir"]) if chosen else work / "none_fp32"
    kept = chosen or fp32_info
    log.info("quantize: %s", decision)
    _publish(source, out_dir)
    fp32_info.update(val_accuracy=fp32_acc, size_ratio=1.0, accuracy_drop=0.0)
    info = {
        **{k: v for k, v in kept.items() if k not in ("dir", "verdict")},
        "decision": decision,
        "gate_passed": chosen is not None or not names,
        "max_accuracy_drop": budget,
        "fp32": {k: v for k, v in fp32_info.items() if k != "dir"},
        "fp32_size_bytes": fp32_size,
        "fp32_file_bytes": fp32_info["file_bytes"],
        "fp32_state_dict_bytes": (model_dir / MODEL_WEIGHTS).stat().st_size,
        "candidates": [{k: v for k, v in c.items() if k != "dir"} for c in candidates],
        "quantize_seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    shutil.rmtree(work, ignore_errors=True)
    QuantizedModel(out_dir, info).save(out_dir)  # last: marks a complete artifact
    return info


def _publish(source: Path, out_dir: Path) -> None:
    """Copy the chosen candidate's model file into ``out_dir`` (its quant.json comes last)."""
    for path in source.iterdir():
        if path.name != QUANT_INFO:
            shutil.copyfile(path, out_dir / path.name)
