"""The ``quantize`` config section: fp32 -> int8 methods, the ``auto`` choice and its gate.

The method and candidate names are the quantize package's vocabulary (``kubetrain.quantize``
builds them, ``select`` chooses among them); they are defined here, once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetrain.core.config import Section

METHODS = ("auto", "dynamic_int8", "weight_only_int8", "static_int8", "qat_int8", "none")
# Every int8 candidate as "method/backend", cheapest to build first: the order auto tries them.
CANDIDATES = (
    "weight_only_int8/torchao",
    "dynamic_int8/torchao",
    "dynamic_int8/fbgemm",
    "static_int8/x86_inductor",
    "qat_int8/x86_inductor",
)
# Quantization-aware training: auto's fallback when post-training int8 loses too much.
QAT = "qat_int8/x86_inductor"


class QuantizeConfig(Section):
    """fp32 -> int8, saved as a ``torch.export`` program; an accuracy gate on validation."""

    method: Literal[METHODS] = Field(  # type: ignore[valid-type]
        "auto",
        description="auto: try auto_candidates (cheap first; for a text model only those that "
        "apply: int8 Linear layers), keep the fastest at batch 64 within "
        "max_accuracy_drop; weight_only_int8: int8 weights (torchao); dynamic_int8: int8 weights "
        "and per-batch activation scales (dynamic_backend); static_int8: PT2E post-training "
        "quantization with the x86 inductor quantizer, calibrated on training data; qat_int8: "
        "PT2E quantization-aware fine-tuning (qat_epochs), same int8 scheme as static_int8; "
        "none: keep fp32.",
    )
    dynamic_backend: Literal["torchao", "fbgemm"] = Field(
        "torchao",
        description="Backend of dynamic_int8: torchao (torch.export program, portable) or fbgemm "
        "(torch.ao.quantization.quantize_dynamic, deprecated and x86/ARM-CPU only, saved as "
        "TorchScript; the one dynamic path that is faster than fp32 on AVX2-only CPUs).",
    )
    auto_candidates: list[Literal[CANDIDATES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: [c for c in CANDIDATES if c != QAT],
        min_length=1,
        description="What auto tries, in order (method/backend).",
    )
    max_accuracy_drop: float = Field(
        0.005,
        ge=0,
        le=1,
        description="Largest loss of the primary validation metric against fp32 that an int8 "
        "model may have (accuracy for classification, BLEU or ROUGE-L (0-1) for seq2seq; 0.005 = "
        "half a point).",
    )
    qat_on_drop: bool = Field(
        True, description="If post-training int8 loses too much, try qat_int8 before giving up."
    )
    on_drop: Literal["fail", "keep_fp32"] = Field(
        "fail",
        description="When no int8 model is within max_accuracy_drop: fail with the numbers, or "
        "keep the fp32 model (method none) and say so.",
    )
    reduce_range: bool = Field(
        True,
        description="7-bit activations for static/QAT int8: needed for accuracy on CPUs without "
        "VNNI, whose u8*s8 kernels saturate.",
    )
    calibration_samples: int = Field(
        512,
        ge=1,
        description="Training samples run through static_int8 observers, and that qat_int8 "
        "calibrates and searches its activation ranges on.",
    )
    qat_epochs: int = Field(
        3,
        ge=1,
        description="Fine-tuning epochs of qat_int8; the last one runs with every range frozen.",
    )
    qat_activation_ranges: Literal["search", "minmax"] = Field(
        "search",
        description="Activation ranges of qat_int8. search: from the fp32 min-max of the "
        "calibration samples, shrink each range to the fraction (1 down to 1/4096) whose "
        "fake-quantized output is closest to the fp32 output, and keep it while fine-tuning (so "
        "that an outlier channel that matters little does not cost every other channel its "
        "resolution); minmax: moving-average min-max observers, never clipping.",
    )
    qat_samples: int = Field(
        8192,
        ge=64,
        description="Training samples that calibration and QAT draw from: all of a smaller "
        "training split, else a seeded random subset (decoded into memory: mind the image size).",
    )
    qat_lr: float = Field(1e-4, gt=0, description="Learning rate of the QAT fine-tuning (Adam).")
    qat_batch_size: int = Field(64, ge=1, description="Batch size of the QAT fine-tuning.")
    latency_repeats: int = Field(
        30, ge=3, description="Timed forward passes per candidate and batch size (auto)."
    )
    num_threads: int = Field(
        1,
        ge=0,
        description="torch threads while quantizing and measuring (0 = torch's default); one "
        "thread keeps side-by-side latencies stable on a small shared CPU.",
    )
    seed: int = Field(0, description="Seed of calibration sampling and QAT shuffling.")
