"""Saving and reloading quantized models without the code that built them.

Formats:

- ``torch.export`` program (``model.pt2``): every method but the fbgemm backend. Tensor
  subclasses (torchao's int8 weights) are unwrapped into plain tensors before export, so the
  archive holds no pickled payload; ``load_program`` checks that before loading, because
  ``torch.export.load`` falls back to full unpickling for such payloads.
- TorchScript (``model.ts``): only ``dynamic_int8/fbgemm`` — eager ``torch.ao`` quantized modules
  cannot be exported. A TorchScript archive holds TorchScript code and tensors, not Python pickle.
- int8 state dict (``model_state.pt``, ``format: state_dict``): models that take token ids
  (text). A seq2seq Transformer decodes through ``encode``/``decode`` and its attributes (special
  ids, sizes), which an exported ``forward`` graph does not keep, and batches of text vary in
  length. So its Linear layers are quantized in place (``quantize_linear``) and the state dict
  is saved; loading rebuilds the fp32 network (kubetrain's code and the model artifact are
  needed), quantizes it the same way and loads the int8 weights (``torch.load(weights_only=
  True)``: torchao's and torch.ao's int8 tensors are allow-listed, nothing else is unpickled).

``quant.json`` says how to run the program: ``eager`` (``ExportedProgram.module()``), ``inductor``
(the same, compiled by ``torch.compile``: the PT2E int8 patterns only become int8 kernels there)
or ``torchscript``; and which modules register the custom ops the graph calls.
"""

from __future__ import annotations

import importlib
import json
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubetrain.core.artifacts import QUANT_INFO, QuantizedModel
from kubetrain.core.errors import KubetrainError
from kubetrain.core.records import Candidate, QuantInfo
from kubetrain.quantize.config import QuantizeConfig

MAX_BATCH = 1 << 16
STATE_DICT_FORMAT = "state_dict"

# Custom-op namespaces a graph may call -> the module whose import registers them.
_OP_MODULES = {"torchao": "torchao", "quantized_decomposed": "torchao.quantization.pt2e"}


def batch_dynamic_shapes() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def export_program(model: nn.Module, example: torch.Tensor, path: Path) -> list[str]:
    """Export ``model`` with a dynamic batch dimension to ``path``; returns modules to import."""
    program = torch.export.export(model, (example,), dynamic_shapes=batch_dynamic_shapes())
    torch.export.save(program, str(path))
    namespaces = {
        str(node.target).split(".")[0]
        for node in program.graph.nodes
        if node.op == "call_function" and "." in str(node.target)
    }
    return sorted(_OP_MODULES[ns] for ns in namespaces if ns in _OP_MODULES)


def check_safe(path: Path) -> None:
    """Refuse a ``.pt2`` archive whose tensors or constants would need Python unpickling."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not name.endswith(("weights_config.json", "constants_config.json")):
                continue
            for fqn, meta in json.loads(archive.read(name))["config"].items():
                if meta.get("use_pickle") or not meta["path_name"].startswith(
                    ("weight_", "tensor_")
                ):
                    raise KubetrainError(
                        f"{path}: '{fqn}' is stored as a pickled object; refusing to load it"
                    )


def load_program(path: Path, imports: Sequence[str] = ()) -> nn.Module:
    """Load an exported program as a callable module (after the safety check)."""
    check_safe(path)
    for module in imports:
        importlib.import_module(module)
    return torch.export.load(str(path)).module()


class Compiled(nn.Module):
    """``torch.compile`` for inference: static shapes (one graph per batch size; dynamic shapes
    break inductor's int8 conv lowering here) and frozen weights (needed for int8 prepacking).

    Freezing is switched on around each call, when a new batch size compiles: passing it as
    ``torch.compile(options=...)`` does not reach the int8 lowering in torch 2.13.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = torch.compile(module, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.inner(x)


def load_artifact(qdir: Path, fp32: nn.Module | None = None) -> tuple[nn.Module, QuantInfo]:
    """The runnable model of a quantized artifact (or candidate) directory and its
    ``quant.json``; an int8 state dict needs ``fp32``, the rebuilt fp32 network
    (``load_state_dict_artifact``)."""
    info_file = qdir / QUANT_INFO
    if not info_file.is_file():
        raise KubetrainError(f"{qdir}: not a kubetrain quantized model (no {QUANT_INFO})")
    info = QuantInfo.read(info_file)
    if info.format == STATE_DICT_FORMAT:
        if fp32 is None:
            raise KubetrainError(f"{qdir}: an int8 state dict: rebuilding it needs the fp32 model")
        return load_state_dict_artifact(qdir, fp32), info
    if info.format == "torchscript":
        return torch.jit.load(str(qdir / (info.file or ""))).eval(), info
    module = load_program(qdir / (info.file or ""), info.imports)
    if info.runtime == "inductor":
        module = Compiled(module)
    return module, info


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a ``.pt2`` or TorchScript archive: the model's weights, without
    the serialized graph, code or sample inputs (which a small model's file is mostly made of)."""
    with zipfile.ZipFile(path) as archive:
        return sum(
            i.file_size
            for i in archive.infolist()
            if ("/data/" in i.filename or "/constants/" in i.filename)
            and "sample_inputs" not in i.filename
            and re.fullmatch(r"(weight_|tensor_)?\d+", i.filename.rsplit("/", 1)[-1])
        )


def quantize_linear(model: nn.Module, method: str, backend: str) -> nn.Module:
    """``model`` with every ``nn.Linear`` int8: ``weight_only_int8`` or ``dynamic_int8`` with
    torchao (in place, ``quantize_``) or ``dynamic_int8`` with fbgemm (``quantize_dynamic``,
    the modules replaced in place). The model keeps its class, methods and attributes."""
    import warnings

    if backend == "fbgemm":
        from torch.ao.quantization import quantize_dynamic

        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise KubetrainError("dynamic_int8/fbgemm: this CPU build has no fbgemm engine")
        torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao deprecation
            return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    if method == "weight_only_int8":
        quantize_(model, Int8WeightOnlyConfig())
    elif method == "dynamic_int8":
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    else:
        raise KubetrainError(f"{method}/{backend}: not a Linear-layer int8 method")
    return model


def load_state_dict_artifact(qdir: Path, fp32: nn.Module) -> nn.Module:
    """The model of an int8 state-dict artifact: ``fp32`` (the rebuilt fp32 network, weights
    loaded or not) quantized like the saved one, then the saved int8 weights (eval mode).

    Raises:
        KubetrainError: ``qdir`` has no quant.json, or the weights do not fit the network.
    """
    info = QuantInfo.read(qdir / QUANT_INFO)
    model = fp32.eval()
    if info.method != "none":
        model = quantize_linear(model, info.method or "", info.backend or "")
    weights = qdir / (info.file or "")
    try:
        model.load_state_dict(torch.load(weights, weights_only=True))
    except (RuntimeError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise KubetrainError(f"{weights}: does not load into the model: {first}") from None
    return model.eval()


def publish(
    out_dir: Path, chosen_dir: Path | None, kept: Candidate, fp32: Candidate,
    candidates: list[Candidate], qcfg: QuantizeConfig, decision: str, gate_passed: bool,
    fp32_state_dict_bytes: int, started: float, work: Path, **extra: Any,
) -> QuantInfo:  # fmt: skip
    """Write the quantize step's artifact: the kept model's files (from ``chosen_dir``, the
    candidate's directory or fp32's), then ``quant.json`` (last: it marks a complete artifact);
    the candidates' ``work`` directory is removed before it.

    ``kept`` is the chosen candidate or ``fp32``; ``started`` the step's start
    (``time.perf_counter``); ``extra`` further ``QuantInfo`` fields (a detector's
    ``latency_batches``). Returns quant.json's record.
    """
    import shutil
    import time

    out_dir.mkdir(parents=True, exist_ok=True)
    if chosen_dir is not None:
        for path in chosen_dir.iterdir():
            if path.name != QUANT_INFO:
                shutil.copyfile(path, out_dir / path.name)
    shutil.rmtree(work, ignore_errors=True)
    info = QuantInfo(
        **kept.model_dump(exclude={"verdict", "metric"}),
        metric=fp32.metric,
        decision=decision,
        gate_passed=gate_passed,
        max_accuracy_drop=qcfg.max_accuracy_drop,
        fp32=fp32,
        fp32_size_bytes=fp32.size_bytes,
        fp32_file_bytes=fp32.file_bytes,
        fp32_state_dict_bytes=fp32_state_dict_bytes,
        candidates=candidates,
        threads=torch.get_num_threads(),
        **extra,
    )
    info.quantize_seconds = time.perf_counter() - started
    QuantizedModel(out_dir, info).save(out_dir)
    return info
