"""fp32 -> int8 with torchao's ``quantize_`` API, and reloading the result in a fresh process.

Artifact directory: ``model.pt`` (state dict; int8 tensors are torchao tensor subclasses that
``torch.load(weights_only=True)`` accepts) and ``quant.json`` (method + how to rebuild the net).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubetrain.errors import KubetrainError
from kubetrain.io import atomic_write, read_json, write_json
from kubetrain.models import build_from_spec

METHODS = ("weight_only_int8", "dynamic_int8", "none")


def _torchao_config(method: str):
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if method == "weight_only_int8":
        return Int8WeightOnlyConfig()
    if method == "dynamic_int8":
        return Int8DynamicActivationInt8WeightConfig()
    raise KubetrainError(f"quantize.method: unknown method {method!r} (use one of {METHODS})")


def load_model(model_dir: str | Path) -> nn.Module:
    """Rebuild the fp32 network of a model artifact and load its weights (eval mode)."""
    model_dir = Path(model_dir)
    if not (model_dir / "model.json").is_file():
        raise KubetrainError(f"{model_dir}: not a kubetrain model (no model.json)")
    model = build_from_spec(read_json(model_dir / "model.json"))
    model.load_state_dict(torch.load(model_dir / "model.pt", weights_only=True))
    return model.eval()


def apply_method(model: nn.Module, method: str) -> nn.Module:
    """Quantize ``model`` in place with ``method`` (``none`` leaves it fp32)."""
    if method != "none":
        from torchao.quantization import quantize_

        quantize_(model, _torchao_config(method))
    return model


def quantize_artifact(model_dir: str | Path, out_dir: str | Path, method: str) -> dict[str, Any]:
    """Quantize the model artifact in ``model_dir`` into ``out_dir``; returns what was done."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    started = time.perf_counter()
    model = apply_method(load_model(model_dir), method)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    atomic_write(out_dir / "model.pt", lambda tmp: torch.save(state, tmp))
    shutil.copyfile(model_dir / "model.json", out_dir / "model.fp32.json")
    info = {
        "method": method,
        "backend": "torchao" if method != "none" else "none",
        "model_json": "model.fp32.json",
        "size_bytes": (out_dir / "model.pt").stat().st_size,
        "fp32_size_bytes": (model_dir / "model.pt").stat().st_size,
        "quantize_seconds": time.perf_counter() - started,
    }
    write_json(out_dir / "quant.json", info)  # last: marks a complete artifact
    return info


def load_quantized(qdir: str | Path) -> nn.Module:
    """Rebuild a quantized artifact in this process (needs kubetrain + torchao, not the run)."""
    qdir = Path(qdir)
    if not (qdir / "quant.json").is_file():
        raise KubetrainError(f"{qdir}: not a kubetrain quantized model (no quant.json)")
    info = read_json(qdir / "quant.json")
    model = apply_method(build_from_spec(read_json(qdir / info["model_json"])), info["method"])
    state = torch.load(qdir / "model.pt", weights_only=True)
    model.load_state_dict(state, assign=True)
    return model.eval()
