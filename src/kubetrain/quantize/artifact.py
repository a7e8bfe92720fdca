"""Saving and reloading quantized models without the code that built them.

Formats:

- ``torch.export`` program (``model.pt2``): every method but the fbgemm backend. Tensor
  subclasses (torchao's int8 weights) are unwrapped into plain tensors before export, so the
  archive holds no pickled payload; ``load_program`` checks that before loading, because
  ``torch.export.load`` falls back to full unpickling for such payloads.
- TorchScript (``model.ts``): only ``dynamic_int8/fbgemm`` — eager ``torch.ao`` quantized modules
  cannot be exported. A TorchScript archive holds TorchScript code and tensors, not Python pickle.

``quant.json`` says how to run the program: ``eager`` (``ExportedProgram.module()``), ``inductor``
(the same, compiled by ``torch.compile``: the PT2E int8 patterns only become int8 kernels there)
or ``torchscript``; and which modules register the custom ops the graph calls.
"""

from __future__ import annotations

import importlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubetrain.artifacts import QUANT_INFO
from kubetrain.errors import KubetrainError

MAX_BATCH = 1 << 16

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


def load_program(path: Path, imports: list[str] = ()) -> nn.Module:
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


def load_artifact(qdir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The runnable model of a quantized artifact directory and its ``quant.json``."""
    info_file = qdir / QUANT_INFO
    if not info_file.is_file():
        raise KubetrainError(f"{qdir}: not a kubetrain quantized model (no {QUANT_INFO})")
    info = json.loads(info_file.read_text())
    if info["format"] == "torchscript":
        return torch.jit.load(str(qdir / info["file"])).eval(), info
    module = load_program(qdir / info["file"], info.get("imports", []))
    if info["runtime"] == "inductor":
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
