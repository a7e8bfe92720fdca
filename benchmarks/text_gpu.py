"""GPU check, language part: MFU of the built-in encoder-decoder Transformer at ~100M
parameters in bf16, trained through kubetrain's step (``Trainer`` + ``train_step``) on one GPU,
eager and with ``torch.compile``.

Run through ``benchmarks/gpu_check.sh`` (after its GPT part) on a machine with one NVIDIA GPU;
writes ``benchmarks/results/gpu_text.json`` and ``gpu_text.md``. ``--smoke`` runs a tiny size on
the CPU, to check the script itself where there is no GPU (its figures mean nothing).

MFU = FLOPs per step (``torch.utils.flop_counter``, counted by the trainer on its first step)
x steps/s, divided by the bf16 dense-GEMM peak measured on the device
(``train.instrument.peak_flops``) and, for known GPUs, by the datasheet's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_train import SHAPES, kubetrain_trainer, tokens_per_step

from kubetrain.core.distributed import DistContext
from kubetrain.train.instrument import peak_flops

RESULTS = Path(__file__).resolve().parent / "results"
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense FLOP/s

# ~110 M parameters: 6+6 layers of width 768 (ff 3072, 12 heads), a 16k vocabulary shared by
# source, target and the tied output layer; 32 pairs of 256 + 256 tokens per step.
SHAPES["gpu"] = {"d_model": 768, "heads": 12, "layers": 6, "ff": 3072, "vocab": 16000,
                 "batch": 32, "src": 256, "tgt": 256}  # fmt: skip
SHAPES["gpu-smoke"] = {"d_model": 32, "heads": 2, "layers": 1, "ff": 64, "vocab": 100,
                       "batch": 2, "src": 8, "tgt": 8}  # fmt: skip


def measure(shape_name: str, ctx: DistContext, compiled: bool, warmup: int, steps: int) -> dict:
    from kubetrain.train.metrics import EpochMeter
    from kubetrain.train.step import batch_generator, train_step

    precision = "bf16" if ctx.device.type == "cuda" else "fp32"  # CPU smoke: bf16 is emulated
    trainer = kubetrain_trainer(
        shape_name, warmup + steps, ctx, "ddp", f"train.precision={precision}",
        f"train.compile={str(compiled).lower()}",
    )  # fmt: skip
    trainer.batches.set_epoch(0, 0)
    meter = EpochMeter(trainer)
    batches = batch_generator(trainer, meter)
    trainer.net.train()
    times = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        train_step(trainer, batches, meter)  # synchronizes the GPU at its end
        times.append(time.perf_counter() - started)
    step = statistics.median(times[warmup:])
    flops = trainer.flops_per_sample * tokens_per_step(SHAPES[shape_name])
    return {
        "name": f"bf16{' + torch.compile' if compiled else ''}" if precision == "bf16" else "fp32",
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "flops_per_step": flops,
        "step_s": step,
        "first_steps_s": times[:warmup],
        "tokens_per_s": tokens_per_step(SHAPES[shape_name]) / step,
        "achieved_flops": flops / step,
    }


def report(runs: list[dict], shape_name: str, gpu: str, peak: float, write: bool) -> None:
    """Print the runs so far as a table; with ``write``, also to results/gpu_text.{json,md}."""
    first = runs[0]
    lines = [
        f"## GPU check, language ({gpu})", "",
        f"Command: `benchmarks/gpu_check.sh`; Seq2SeqTransformer {SHAPES[shape_name]}, "
        f"{first['parameters'] / 1e6:.0f} M parameters, {first['flops_per_step'] / 1e12:.2f} "
        f"TFLOP per step, through kubetrain's training step (Trainer + train_step, bf16 "
        f"autocast, fused AdamW). Measured bf16 GEMM peak: {peak / 1e12:.0f} TFLOP/s. "
        "Target: MFU ≥ 40 %.", "",
        "| run | step (ms) | tokens/s | MFU vs measured peak | MFU vs datasheet |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for r in runs:
        vs_sheet = f"{100 * r['mfu_vs_datasheet']:.1f} %" if "mfu_vs_datasheet" in r else "–"
        lines.append(f"| {r['name']} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{100 * r['mfu_vs_measured_peak']:.1f} % | {vs_sheet} |")  # fmt: skip
    print("\n".join(lines), flush=True)
    if write:  # a smoke run on the CPU checks the script; its figures mean nothing
        RESULTS.mkdir(exist_ok=True)
        results = {"device": gpu, "shape": SHAPES[shape_name], "torch": torch.__version__,
                   "measured_peak": peak, "runs": runs}  # fmt: skip
        (RESULTS / "gpu_text.json").write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / "gpu_text.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    ctx = DistContext(device=device)
    shape_name = "gpu" if cuda else "gpu-smoke"
    gpu = torch.cuda.get_device_name() if cuda else "cpu (smoke)"
    peak = peak_flops(device.type, torch.bfloat16 if cuda else torch.float32)
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in gpu), None)
    runs: list[dict] = []
    for compiled in (False, True) if cuda else (False,):
        run = measure(shape_name, ctx, compiled, warmup=10 if compiled else 5, steps=args.steps)
        run["mfu_vs_measured_peak"] = run["achieved_flops"] / peak
        if sheet:
            run["mfu_vs_datasheet"] = run["achieved_flops"] / sheet
        runs.append(run)
        print(json.dumps(run), flush=True)
        # Written after every run: should compiling outlast gpu_check.sh's timeout, the eager
        # figures are kept.
        report(runs, shape_name, gpu, peak, write=cuda)
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
