"""int8 for a detector: the methods that apply, each measured for mAP and latency, the gate in
mAP points.

A detector is not one tensor-in, tensor-out graph: its transform resizes a list of images of
any size, proposals and non-maximum suppression have data-dependent sizes. So it is not exported
whole; each method quantizes the part it applies to and the rest stays the fp32 model's:

| candidate                  | what becomes int8                                     | saved as                  |
|----------------------------|-------------------------------------------------------|---------------------------|
| `weight_only_int8/torchao` | the heads' ``nn.Linear`` weights (Faster R-CNN's box  | int8 state dict           |
|                            | head and predictor; RetinaNet, FCOS and SSD have none)|                           |
| `dynamic_int8/torchao`     | the same Linear layers, activations per batch         | int8 state dict           |
| `dynamic_int8/fbgemm`      | the same, with ``torch.ao``'s ``quantize_dynamic``    | int8 state dict           |
| `static_int8/x86_inductor` | the backbone (body + FPN: every convolution): PT2E,   | ``torch.export`` program  |
|                            | ``X86InductorQuantizer``, calibrated on training      | of the backbone, run      |
|                            | images after the detector's own transform             | compiled (inductor)       |

QAT is not offered for detectors (its fine-tuning would need the detector's losses through a
fake-quantized backbone; left out rather than half done). The static backbone is exported for
one input size: the detector's largest padded batch (its transform's ``max_size`` rounded up to
``size_divisible``, or SSD's fixed size), and the transform pads every batch to it (zeros
bottom-right, as it pads a batch to its largest image anyway), so any image runs through it and
the anchors follow the padded size.

Loading (:func:`load_detector`) rebuilds the fp32 detector from the model artifact and applies
the candidate; ``quant.json`` says which (``format: detector``).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from kubetrain.core.artifacts import MODEL_WEIGHTS, QUANT_INFO, QUANT_STATE_DICT
from kubetrain.core.errors import ConfigError, KubetrainError
from kubetrain.core.records import Candidate, QuantInfo
from kubetrain.quantize import artifact, select
from kubetrain.quantize.candidates import Tried, attempt, measure_against
from kubetrain.quantize.config import QAT, QuantizeConfig

if TYPE_CHECKING:
    from kubetrain.tasks.detection import DetectionTask

log = logging.getLogger(__name__)

FORMAT = "detector"
BACKBONE_PROGRAM = "backbone.pt2"
LINEAR_METHODS = ("weight_only_int8/torchao", "dynamic_int8/torchao", "dynamic_int8/fbgemm")
STATIC = "static_int8/x86_inductor"
LATENCY_BATCHES = (1, 8)  # a detector on a CPU: batch 64 would take minutes per candidate
CALIBRATION_BATCH = 8


def not_applicable(name: str, model: nn.Module) -> str | None:
    """Why candidate ``name`` does not apply to ``model`` (None if it does), in one line."""
    if name == QAT:
        return (
            "qat_int8 is not offered for detectors (its fine-tuning would need the detector's "
            "own losses through a fake-quantized backbone); use static_int8 or the Linear-layer "
            "methods"
        )
    if name in LINEAR_METHODS and not any(isinstance(m, nn.Linear) for m in model.modules()):
        return (
            f"{name} does not apply to {type(model).__name__}: it has no Linear layers (its heads "
            "are convolutions); weight-only and dynamic int8 quantize Linear layers"
        )
    if name == STATIC and not isinstance(getattr(model, "backbone", None), nn.Module):
        return f"{name} needs a 'backbone' module to export; {type(model).__name__} has none"
    if name == STATIC and _pad_size(model) is None:
        return f"{name}: {type(model).__name__} has no torchvision transform to fix its input size"
    return None


# -- the static backbone ------------------------------------------------------------------------
def _pad_size(model: nn.Module) -> tuple[int, int] | None:
    """The largest batch tensor the detector's transform makes: its ``max_size`` (or SSD's
    ``fixed_size``) rounded up to ``size_divisible``; None without such a transform."""
    transform = getattr(model, "transform", None)
    if transform is None or not hasattr(transform, "size_divisible"):
        return None
    divisible = int(transform.size_divisible)
    fixed = getattr(transform, "fixed_size", None)
    h, w = (fixed[0], fixed[1]) if fixed else (transform.max_size, transform.max_size)
    return (math.ceil(h / divisible) * divisible, math.ceil(w / divisible) * divisible)


class PaddedTransform(nn.Module):
    """The detector's transform, its batches padded to one size (zeros bottom-right, where it
    pads a batch anyway): the input size the int8 backbone was exported for."""

    def __init__(self, inner: Any, size: tuple[int, ...]) -> None:
        super().__init__()
        self.inner: Any = inner  # a GeneralizedRCNNTransform
        self.size = (int(size[0]), int(size[1]))

    def forward(self, images, targets=None):
        import torch.nn.functional as F

        image_list, targets = self.inner(images, targets)
        h, w = image_list.tensors.shape[-2:]
        if (h, w) != self.size:
            if h > self.size[0] or w > self.size[1]:
                raise KubetrainError(
                    f"int8 backbone: a batch of {h}x{w} exceeds the exported {self.size}"
                )
            pad = (0, self.size[1] - w, 0, self.size[0] - h)
            image_list.tensors = F.pad(image_list.tensors, pad)
        return image_list, targets

    def postprocess(self, *args, **kwargs):
        return self.inner.postprocess(*args, **kwargs)


class ProgramBackbone(nn.Module):
    """A loaded backbone program in the place of the fp32 backbone (``out_channels`` kept:
    torchvision's heads read it)."""

    def __init__(self, program: nn.Module, out_channels: int | None) -> None:
        super().__init__()
        self.program = program
        if out_channels is not None:
            self.out_channels = out_channels

    def train(self, mode: bool = True) -> ProgramBackbone:
        # An exported program runs in one mode ("Calling train() is not supported"): the
        # detector's eval() must not reach it.
        self.training = mode
        return self

    def forward(self, x):
        return self.program(x)


def _backbone_inputs(model: nn.Module, images: list[torch.Tensor], size) -> list[torch.Tensor]:
    """Calibration batches: ``images`` through the detector's transform, padded to ``size``."""
    padded = PaddedTransform(model.transform, size).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), CALIBRATION_BATCH):
            image_list, _ = padded(images[start : start + CALIBRATION_BATCH])
            out.append(image_list.tensors)
    return out


def _static_backbone(model: nn.Module, images: list[torch.Tensor], qcfg: QuantizeConfig,
                     path: Path) -> list[str]:  # fmt: skip
    """PT2E static int8 of ``model.backbone`` calibrated on ``images``, exported to ``path``;
    returns the modules its graph's ops need."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from kubetrain.quantize.methods import _export_for_pt2e, _strip_unused, _x86_quantizer

    batches = _backbone_inputs(model, images, _pad_size(model))
    backbone = cast(nn.Module, model.backbone).eval()
    prepared = prepare_pt2e(_export_for_pt2e(backbone, batches[0]), _x86_quantizer(qcfg))
    with torch.no_grad():
        for x in batches:
            prepared(x)
    converted = _strip_unused(convert_pt2e(prepared))
    return artifact.export_program(converted, batches[0], path)


# -- build and load -----------------------------------------------------------------------------
def build_candidate(
    name: str, model: nn.Module, images: list[torch.Tensor], qcfg: QuantizeConfig, out_dir: Path
) -> Candidate:
    """Quantize a copy of ``model`` as candidate ``name`` into ``out_dir`` (``quant.json``
    beside); ``images`` are the calibration images. Returns its info."""
    method, backend = name.split("/")
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    qmodel = copy.deepcopy(model).eval()
    info = Candidate(name=name, method=method, backend=backend, format=FORMAT)
    if name in LINEAR_METHODS:
        artifact.quantize_linear(qmodel, method, backend)
        torch.save(qmodel.state_dict(), out_dir / QUANT_STATE_DICT)
        size = (out_dir / QUANT_STATE_DICT).stat().st_size
        info = info.model_copy(update={
            "file": QUANT_STATE_DICT, "runtime": "eager", "part": "heads (Linear layers)",
            "imports": ["torchao"] if backend == "torchao" else [], "size_bytes": size,
            "file_bytes": size,
        })  # fmt: skip
    elif name == STATIC:
        imports = _static_backbone(qmodel, images, qcfg, out_dir / BACKBONE_PROGRAM)
        rest = sum(
            t.numel() * t.element_size()
            for k, t in model.state_dict().items()
            if not k.startswith("backbone.")
        )
        info = info.model_copy(update={
            "file": BACKBONE_PROGRAM, "runtime": "inductor", "part": "backbone (body + FPN)",
            "imports": imports, "pad_to": list(_pad_size(model) or ()),
            "out_channels": getattr(model.backbone, "out_channels", None),
            "size_bytes": artifact.tensor_bytes(out_dir / BACKBONE_PROGRAM) + rest,
            "file_bytes": (out_dir / BACKBONE_PROGRAM).stat().st_size,
        })  # fmt: skip
    else:
        raise KubetrainError(f"quantize: {name} is not a detector int8 method")
    info.quantize_seconds = time.perf_counter() - started
    info.write(out_dir / QUANT_INFO)
    return info


def load_detector(qdir: Path, fp32: nn.Module) -> nn.Module:
    """The runnable detector of a ``format: detector`` artifact: ``fp32`` (the rebuilt fp32
    detector, trained weights loaded) with the candidate applied, in eval mode.

    Raises:
        KubetrainError: the saved weights or program do not fit ``fp32``.
    """
    info = QuantInfo.read(Path(qdir) / QUANT_INFO)
    model = fp32.eval()
    name = f"{info.method}/{info.backend}"
    if info.method == "none":
        return model
    if name in LINEAR_METHODS:
        model = artifact.load_state_dict_artifact(Path(qdir), model)
        return model.eval()
    if name == STATIC:
        program = artifact.load_program(Path(qdir) / (info.file or ""), info.imports)
        if info.runtime == "inductor":
            program = artifact.Compiled(program)
        model.backbone = ProgramBackbone(program, info.out_channels)
        model.transform = PaddedTransform(model.transform, tuple(info.pad_to or ()))
        return model.eval()
    raise KubetrainError(f"{qdir}: unknown detector int8 method {name}")


# -- the driver ---------------------------------------------------------------------------------
def _names(qcfg: QuantizeConfig, model: nn.Module) -> tuple[list[str], list[Candidate]]:
    """What to try (auto: its candidates that apply; else the named method) and what auto left
    out, with why.

    Raises:
        ConfigError: the named method does not apply to the detector.
    """
    from kubetrain.quantize import methods

    if qcfg.method == "none":
        return [], []
    if qcfg.method == "auto":
        names = [n for n in methods.CHEAP_FIRST if n in qcfg.auto_candidates]
        skipped = [Candidate(name=n, error=f"not applicable: {why}")
                   for n in names if (why := not_applicable(n, model))]  # fmt: skip
        return [n for n in names if not not_applicable(n, model)], skipped
    name = methods.candidate_for(qcfg.method, qcfg)
    why = not_applicable(name, model)
    if why:
        raise ConfigError(f"config error: quantize.method: {why}")
    return [name], []


def _attempt(
    name: str, work: Path, fp32: nn.Module, fp32_info: Candidate, images: list[torch.Tensor],
    qcfg: QuantizeConfig, task: DetectionTask, model_dir: Path,
    load_model: Callable[[Path, DetectionTask], nn.Module],
) -> Tried:  # fmt: skip
    """Build candidate ``name``, reload it from its files and score it on the validation
    split (``candidates.attempt``: under ``auto`` a failure is recorded, not raised)."""
    cdir = work / name.replace("/", "_")

    def build() -> tuple[Candidate, nn.Module, float]:
        info = build_candidate(name, fp32, images, qcfg, cdir)
        runnable = load_detector(cdir, load_model(model_dir, task))
        return info, runnable, task.score(runnable, "val").values[fp32_info.metric or "map"]

    return attempt(name, cdir, qcfg, fp32_info, build)


def quantize_detector(
    model_dir: Path,
    out_dir: Path,
    qcfg: QuantizeConfig,
    task: DetectionTask,
    load_model: Callable[[Path, DetectionTask], nn.Module],
) -> QuantInfo:
    """The quantize step for a detector (see the module docstring): every candidate that
    applies built, reloaded from its files and scored on the validation split (the task's
    primary metric: COCO mAP), latency at batch 1 and 8 side by side, the gate
    (``max_accuracy_drop`` in mAP: 0.01 is one point) and the choice; fp32 is kept with the
    numbers when nothing passes and ``on_drop`` is ``keep_fp32``.

    Args:
        model_dir: the train step's model artifact.
        out_dir: where the quantized artifact is written.
        qcfg: the quantize section.
        task: the detection task the model was trained with (scored as evaluate will).
        load_model: ``(model_dir, task) -> the fp32 detector`` with its trained weights, in
            eval mode (``kubetrain.quantize.driver.load_model``).

    Returns:
        quant.json's content.

    Raises:
        KubetrainError: nothing passes the gate and ``on_drop`` is ``fail``, or an explicit
            method failed.
        ConfigError: an explicit method that does not apply to the detector.
    """

    started = time.perf_counter()
    fp32 = load_model(model_dir, task)
    names, skipped = _names(qcfg, fp32)
    scores = task.score(fp32, "val")
    metric, reference = scores.metric, scores.value
    work = out_dir / "candidates"
    images = task.sample_images("train", qcfg.calibration_samples, seed=qcfg.seed) if names else []
    fp32_bytes = (Path(model_dir) / MODEL_WEIGHTS).stat().st_size
    fp32_info = Candidate(
        name="none/fp32", method="none", backend="fp32", format=FORMAT, runtime="eager",
        size_bytes=fp32_bytes, file_bytes=fp32_bytes, metric=metric, val_metric=reference,
    )  # fmt: skip
    measure_against(fp32_info, fp32_info, reference)  # the reference: drop 0, size 1x
    tried = [
        _attempt(name, work, fp32, fp32_info, images, qcfg, task, model_dir, load_model)
        for name in names
    ]
    _measure_latency(task, fp32, fp32_info, tried, qcfg)
    candidates = [t.info for t in tried] + skipped
    none = None
    if not names:
        none = "quantize.method none" if qcfg.method == "none" else (
            "no int8 method applies to this detector; keeping fp32")  # fmt: skip
    chosen, decision = select.decide(
        candidates, qcfg, metric, reference, max(LATENCY_BATCHES), none
    )
    log.info("quantize: %s", decision)
    return artifact.publish(
        out_dir, next((t.dir for t in tried if t.info is chosen), None), chosen or fp32_info,
        fp32_info, candidates, qcfg, decision, gate_passed=chosen is not None or not names,
        fp32_state_dict_bytes=fp32_bytes, started=started, work=work,
        latency_batches=list(LATENCY_BATCHES),
    )  # fmt: skip


def _measure_latency(
    task: DetectionTask,
    fp32: nn.Module,
    fp32_info: Candidate,
    tried: list[Tried],
    qcfg: QuantizeConfig,
) -> None:
    """Latency of fp32 and every built candidate at batch 1 and 8, timed side by side (padded
    validation images); written into the candidates and ``fp32_info``."""
    from kubetrain.tasks.measure import compare_latency

    built = {t.info.name: t.model for t in tried if t.model is not None}
    if not built:
        return
    x, _ = task.examples("val", max(LATENCY_BATCHES), seed=qcfg.seed)
    for batch in LATENCY_BATCHES:
        lat = compare_latency({"none/fp32": fp32, **built}, x, None, batch, qcfg.latency_repeats)
        base = lat["none/fp32"]["median"]
        setattr(fp32_info, f"latency_ms_b{batch}", base)
        for c in (t.info for t in tried):
            if c.name in lat:
                setattr(c, f"latency_ms_b{batch}", lat[c.name]["median"])
                setattr(c, f"latency_ratio_b{batch}", lat[c.name]["median"] / base)
