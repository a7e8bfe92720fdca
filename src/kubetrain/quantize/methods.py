"""The quantization methods: fp32 module in, artifact directory out (see ``artifact``).

| candidate                  | how                                                     | runs as     |
|----------------------------|---------------------------------------------------------|-------------|
| `none/fp32`                | the fp32 model, exported                                | eager       |
| `weight_only_int8/torchao` | ``quantize_(Int8WeightOnlyConfig)``, exported           | eager       |
| `dynamic_int8/torchao`     | ``quantize_(Int8DynamicActivationInt8WeightConfig)``    | eager       |
| `dynamic_int8/fbgemm`      | ``torch.ao.quantization.quantize_dynamic`` (deprecated) | TorchScript |
| `static_int8/x86_inductor` | PT2E + ``X86InductorQuantizer``, calibrated on train    | inductor    |
| `qat_int8/x86_inductor`    | PT2E QAT, same quantizer: ranges searched, fine-tuned   | inductor    |

Models that take token ids (the text Transformers) get the Linear-layer methods only
(``TOKEN_METHODS``), saved as an int8 state dict (``artifact.STATE_DICT_FORMAT``): see
``not_applicable`` for why the PT2E ones are left out.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kubetrain.core.artifacts import QUANT_INFO, QUANT_PROGRAM, QUANT_SCRIPT, QUANT_STATE_DICT
from kubetrain.core.errors import KubetrainError
from kubetrain.core.records import Candidate, QatStats
from kubetrain.quantize import artifact
from kubetrain.quantize.config import CANDIDATES, QuantizeConfig

CHEAP_FIRST = CANDIDATES  # the order auto tries them in
# What applies to a model whose inputs are token ids: int8 Linear layers.
TOKEN_METHODS = ("weight_only_int8/torchao", "dynamic_int8/torchao", "dynamic_int8/fbgemm")


def not_applicable(name: str, token_inputs: bool) -> str | None:
    """Why candidate ``name`` does not apply to the model (None if it does), in one line.

    ``token_inputs``: the model takes integer token ids (a text model).
    """
    if token_inputs and name not in TOKEN_METHODS:
        return (
            f"{name} does not apply to a text model: PT2E int8 calibrates one exported forward "
            "graph, and a text model takes token ids of varying length and (seq2seq) decodes "
            "through encode/decode, which that graph does not keep; use dynamic_int8 or "
            "weight_only_int8 (its Linear layers in int8)"
        )
    return None


def build_state_dict(name: str, model: nn.Module, qcfg: QuantizeConfig, out_dir: Path) -> Candidate:
    """Candidate ``name`` for a model that takes token ids: a copy of ``model`` with its Linear
    layers in int8 (``artifact.quantize_linear``), saved as a state dict; returns its info."""
    method, backend = name.split("/")
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    qmodel = copy.deepcopy(model).eval()
    if method != "none":
        qmodel = artifact.quantize_linear(qmodel, method, backend)
    info = _save_state(qmodel, out_dir, name, method, backend)
    info.quantize_seconds = time.perf_counter() - started
    info.write(out_dir / QUANT_INFO)
    return info


def _save_state(model: nn.Module, out_dir: Path, name: str, method: str, backend: str) -> Candidate:
    path = out_dir / QUANT_STATE_DICT
    torch.save(model.state_dict(), path)
    size = path.stat().st_size
    return Candidate(
        name=name,
        method=method,
        backend=backend,
        format=artifact.STATE_DICT_FORMAT,
        file=QUANT_STATE_DICT,
        runtime="eager",
        imports=["torchao"] if backend == "torchao" else [],
        # A state dict is little besides its tensors: its size is the weights' size.
        size_bytes=size,
        file_bytes=size,
    )


def candidate_for(method: str, qcfg: QuantizeConfig) -> str:
    """The ``method/backend`` name of an explicitly chosen method."""
    return {
        "none": "none/fp32",
        "weight_only_int8": "weight_only_int8/torchao",
        "dynamic_int8": f"dynamic_int8/{qcfg.dynamic_backend}",
        "static_int8": "static_int8/x86_inductor",
        "qat_int8": "qat_int8/x86_inductor",
    }[method]


def build(
    name: str,
    model: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    input_shape: list[int],
    qcfg: QuantizeConfig,
    out_dir: Path,
) -> Candidate:
    """Quantize a copy of ``model`` as candidate ``name`` into ``out_dir``; returns its info."""
    method, backend = name.split("/")
    started = time.perf_counter()
    model = copy.deepcopy(model).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(qcfg.seed)
    example = _batch(x_train, input_shape, torch.randperm(len(x_train), generator=gen)[:64])
    info = Candidate(name=name, method=method, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation and export chatter
        if backend == "fbgemm":
            _fbgemm_dynamic(model, example, out_dir)
            info.format, info.file, info.runtime = "torchscript", QUANT_SCRIPT, "torchscript"
        else:
            if method in ("weight_only_int8", "dynamic_int8"):
                _torchao(model, method)
            elif method == "static_int8":
                idx = torch.randperm(len(x_train), generator=gen)[: qcfg.calibration_samples]
                model = _pt2e_static(model, _batch(x_train, input_shape, idx), example, qcfg)
            elif method == "qat_int8":
                model, info.qat = _pt2e_qat(model, x_train, y_train, input_shape, qcfg)
            info.imports = artifact.export_program(model, example, out_dir / QUANT_PROGRAM)
            info.format, info.file = "torch.export", QUANT_PROGRAM
            info.runtime = "inductor" if backend == "x86_inductor" else "eager"
    path = out_dir / (info.file or QUANT_PROGRAM)
    info.size_bytes = artifact.tensor_bytes(path)
    info.file_bytes = path.stat().st_size
    info.quantize_seconds = time.perf_counter() - started
    info.write(out_dir / QUANT_INFO)
    return info


def _batch(x: np.ndarray, input_shape: list[int], idx: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(x[idx.numpy()]).reshape(-1, *input_shape)


def _torchao(model: nn.Module, method: str) -> None:
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )
    from torchao.utils import unwrap_tensor_subclass

    config = Int8WeightOnlyConfig() if method == "weight_only_int8" else None
    quantize_(model, config or Int8DynamicActivationInt8WeightConfig())
    # Plain tensors + ops instead of tensor subclasses: exportable without pickled weights.
    unwrap_tensor_subclass(model)


def _fbgemm_dynamic(model: nn.Module, example: torch.Tensor, out_dir: Path) -> None:
    """``quantize_dynamic`` (fbgemm) of the Linear layers, saved as frozen TorchScript."""
    from torch.ao.quantization import quantize_dynamic

    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise KubetrainError("dynamic_int8/fbgemm: this CPU build has no fbgemm engine")
    torch.backends.quantized.engine = "fbgemm"
    qmodel = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with torch.inference_mode():
        script = torch.jit.freeze(torch.jit.trace(qmodel, example))
    script.save(str(out_dir / QUANT_SCRIPT))


def _x86_quantizer(qcfg: QuantizeConfig, is_qat: bool = False):
    # Imported only here: importing this module breaks torch.compile of torchao quantize_
    # models in the same process (torchao 0.18), and nothing else compiles those.
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(
        xiq.get_default_x86_inductor_quantization_config(
            is_qat=is_qat, reduce_range=qcfg.reduce_range
        )
    )
    return quantizer


def _export_for_pt2e(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``model`` exported (batch dimension dynamic) as the graph module PT2E prepares.

    Each call of a module gets its own source partition. A non-strict export records where a
    node came from only as the module's name (``nn_module_stack``), and the PT2E quantizers group
    nodes into partitions by that name: a module called twice in one forward (torchvision's
    ResNet blocks call one ``nn.ReLU`` after their first convolution and again after the residual
    add) becomes one partition with two outputs, and ``X86InductorQuantizer`` stops with "Input
    partition has more than one output node". A module's nodes are contiguous in the graph, so
    the second and later runs of a name get ``name@1``, ``name@2`` (the suffix ``torch.export``
    itself gives repeated calls).
    """
    graph = torch.export.export(
        model, (example,), dynamic_shapes=artifact.batch_dynamic_shapes()
    ).module()
    calls: dict[str, int] = {}
    previous = None
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if not stack:
            previous = None
            continue
        key = next(reversed(stack))
        fqn, cls = stack[key]
        if fqn != previous:
            calls[fqn] = calls.get(fqn, -1) + 1
        previous = fqn
        if calls[fqn]:
            node.meta["nn_module_stack"] = {**stack, key: (f"{fqn}@{calls[fqn]}", cls)}
    return graph


def _strip_unused(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop the fp32 parameters ``convert_pt2e`` leaves attached beside their int8 copies."""
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
    return gm


def _pt2e_static(
    model: nn.Module, calib: torch.Tensor, example: torch.Tensor, qcfg: QuantizeConfig
) -> nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(_export_for_pt2e(model, example), _x86_quantizer(qcfg))
    with torch.no_grad():
        for start in range(0, len(calib), 64):
            prepared(calib[start : start + 64])
    return _strip_unused(convert_pt2e(prepared))


def _pt2e_qat(
    model: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    input_shape: list[int],
    qcfg: QuantizeConfig,
) -> tuple[nn.Module, QatStats]:
    """Fake-quantize with the x86 quantizer's QAT config, set the activation ranges
    (``qcfg.qat_activation_ranges``), fine-tune, convert to int8.

    The last epoch runs with every range frozen, so the converted model has the scales its
    weights were last trained against. Returns the converted model and what was done.

    Batch norms that follow a convolution are folded into it first (their statistics frozen,
    as torchvision's QAT recipe freezes them after its first epochs), so QAT trains the folded
    weights that int8 will hold. Not left to torchao's QAT conv + batch-norm pattern: it is
    written with eps 1e-5 and momentum 0.1 and neither ``prepare_qat_pt2e`` nor
    ``convert_pt2e`` copies the model's own (torchao 0.18: "TODO: allow setting eps"), so a
    model with other ones (torchvision's MobileNetV3 and EfficientNet: eps 1e-3) was folded
    with the wrong eps: MobileNetV3 QAT lost 40-60 points where static int8 lost 2.
    """
    from torchao.quantization.pt2e import (
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_  # what prepare_pt2e does

    gen = torch.Generator().manual_seed(qcfg.seed)
    bs = min(qcfg.qat_batch_size, len(x_train))
    example = _batch(x_train, input_shape, torch.arange(bs))
    graph = _export_for_pt2e(model.eval(), example)
    _fuse_conv_bn_(graph)
    literals = _batch_norm_literals(graph)
    prepared = prepare_qat_pt2e(graph, _x86_quantizer(qcfg, is_qat=True))

    def mode(train: bool) -> None:
        # Switching an exported model's mode rewrites the batch norms left with the defaults.
        (move_exported_model_to_train if train else move_exported_model_to_eval)(prepared)
        _restore_batch_norm_literals(prepared, literals)

    y = torch.from_numpy(y_train)
    idx = torch.randperm(len(x_train), generator=gen)[: qcfg.calibration_samples]
    info = QatStats(epochs=qcfg.qat_epochs, lr=qcfg.qat_lr)
    mode(train=False)
    info.activation_ranges = _qat_ranges(
        prepared, _batch(x_train, input_shape, idx), qcfg.qat_activation_ranges
    )
    mode(train=True)
    info.train_loss = _fine_tune(prepared, x_train, y, input_shape, qcfg, bs, gen)
    mode(train=False)
    converted = _strip_unused(convert_pt2e(prepared))
    return converted, info


def _fine_tune(
    prepared: torch.fx.GraphModule, x_train: np.ndarray, y: torch.Tensor, input_shape: list[int],
    qcfg: QuantizeConfig, bs: int, gen: torch.Generator,
) -> list[float]:  # fmt: skip
    """``qcfg.qat_epochs`` epochs of Adam on whole batches of the training samples, the last
    with every observer frozen; returns the mean loss of each epoch."""
    from torchao.quantization.pt2e import disable_observer

    optimizer = torch.optim.Adam(prepared.parameters(), lr=qcfg.qat_lr)
    losses = []
    for epoch in range(qcfg.qat_epochs):
        if epoch == qcfg.qat_epochs - 1:
            prepared.apply(disable_observer)
        order = torch.randperm(len(x_train), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(order) - bs + 1, bs):  # whole batches only
            idx = order[start : start + bs]
            loss = F.cross_entropy(prepared(_batch(x_train, input_shape, idx)), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * bs, count + bs
        losses.append(total / max(count, 1))
    return losses


_BATCH_NORMS = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default)


def _batch_norm_literals(gm: torch.fx.GraphModule) -> dict[str, tuple[float, float]]:
    """``(momentum, eps)`` of each batch norm of ``gm``, by its running-variance attribute."""
    return {
        node.args[4].target: (node.args[6], node.args[7])
        for node in gm.graph.nodes
        if node.target in _BATCH_NORMS and node.args[4].op == "get_attr"
    }


def _restore_batch_norm_literals(
    gm: torch.fx.GraphModule, literals: dict[str, tuple[float, float]]
) -> None:
    """Put each batch norm's own momentum and eps back after ``move_exported_model_to_train``
    or ``_eval``: they rewrite every batch norm of an exported model with momentum 0.1 and eps
    1e-5 (torchao 0.18: "still fails to support custom momentum and eps value")."""
    for node in gm.graph.nodes:
        if node.target in _BATCH_NORMS and node.args[4].op == "get_attr":
            momentum, eps = literals.get(node.args[4].target, (node.args[6], node.args[7]))
            node.args = (*node.args[:6], momentum, eps, *node.args[8:])
    gm.recompile()


# Range fractions tried by the QAT range search: 1, 1/sqrt(2), ... 1/4096.
_RANGE_FRACTIONS = tuple(2 ** (-i / 2) for i in range(25))


def _qat_ranges(prepared: torch.fx.GraphModule, x: torch.Tensor, mode: str) -> dict[str, Any]:
    """Calibrate the fake-quantizers of ``prepared`` (eval mode) on the samples ``x``.

    Every quantizer first records the fp32 min-max of ``x`` (fake quantization off, so no range
    is measured on an already-quantized input). ``minmax`` stops there: moving-average observers
    keep tracking during fine-tuning and never clip. ``search`` then picks, for each per-tensor
    activation range in graph order, the fraction of its fp32 range (``_RANGE_FRACTIONS``) whose
    fake-quantized model output is closest to the fp32 output (mean squared logit error), and
    keeps it fixed. Why: one activation tensor has one scale, so an outlier channel 100x larger
    than the rest leaves the others a few of the 128 levels; gradients never reach a min-max
    range, and shrinking the outlier through the weights is far beyond a few epochs of
    fine-tuning. The model's output tells whether an outlier can be clipped (little downstream
    weight) or not; an activation-MSE criterion (static_int8's histogram observer) keeps large
    outliers whatever they are worth. The output, not the training loss: the fp32 model fits its
    training samples almost perfectly, so the loss barely tells ranges apart and picks noise.

    Returns the mode, and with ``search`` the chosen fractions and the output error before and
    after.
    """
    from torchao.quantization.pt2e import disable_fake_quant, enable_fake_quant

    with torch.no_grad():
        prepared.apply(disable_fake_quant)
        reference = prepared(x)
        prepared.apply(enable_fake_quant)
        if mode == "minmax":
            return {"mode": mode}
        acts = _activation_quantizers(prepared)
        fp32 = {}
        for name, fq in acts.items():
            fq.disable_observer()
            obs = fq.activation_post_process
            fp32[name] = (obs.min_val.clone(), obs.max_val.clone())
            _set_range(fq, *fp32[name])

        def error() -> float:
            return F.mse_loss(prepared(x), reference).item()

        before = error()
        chosen = {}
        for name, fq in acts.items():
            low, high = fp32[name]
            best_error, best = math.inf, 1.0
            for fraction in _RANGE_FRACTIONS:
                _set_range(fq, low * fraction, high * fraction)
                value = error()
                if value < best_error:
                    best_error, best = value, fraction
                elif value > 2 * best_error:  # well past the minimum
                    break
            _set_range(fq, low * best, high * best)
            chosen[name] = best
        return {
            "mode": mode,
            "fractions": chosen,
            "output_mse_minmax": before,
            "output_mse_searched": error(),
        }


def _activation_quantizers(prepared: torch.fx.GraphModule) -> dict[str, Any]:
    """The per-tensor fake-quantizers of activations (not of weights), by node, in graph order."""
    from torchao.quantization.pt2e import FakeQuantizeBase

    acts = {}
    for node in prepared.graph.nodes:
        module = prepared.get_submodule(node.target) if node.op == "call_module" else None
        if (
            isinstance(module, FakeQuantizeBase)
            and not module.is_per_channel
            and node.args[0].op != "get_attr"  # a weight, not an activation
        ):
            acts[node.target] = module
    return acts


def _set_range(fq: Any, low: torch.Tensor, high: torch.Tensor) -> None:
    """Fix a fused fake-quantizer's range (``fq``: torchao's ``FusedMovingAvgObsFakeQuantize``)
    : its scale now, and what ``convert_pt2e`` reads."""
    obs = fq.activation_post_process
    obs.min_val.copy_(low)
    obs.max_val.copy_(high)
    scale, zero_point = obs.calculate_qparams()
    fq.scale.copy_(scale)
    fq.zero_point.copy_(zero_point)


def fp32_program(model: nn.Module, example: torch.Tensor, out_dir: Path) -> Candidate:
    """The fp32 model as an exported program (what ``on_drop: keep_fp32`` ships); a model
    that takes token ids as a state dict, like its int8 candidates."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not example.is_floating_point():
        info = _save_state(model.eval(), out_dir, "none/fp32", "none", "fp32")
        info.write(out_dir / QUANT_INFO)
        return info
    imports = artifact.export_program(model.eval(), example, out_dir / QUANT_PROGRAM)
    info = Candidate(
        name="none/fp32",
        method="none",
        backend="fp32",
        format="torch.export",
        file=QUANT_PROGRAM,
        runtime="eager",
        imports=imports,
        size_bytes=artifact.tensor_bytes(out_dir / QUANT_PROGRAM),
        file_bytes=(out_dir / QUANT_PROGRAM).stat().st_size,
    )
    info.write(out_dir / QUANT_INFO)
    return info
