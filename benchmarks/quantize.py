"""Quantization benchmark: every method on three models, what ``auto`` keeps, QAT recovery.

For each model (the default MLP, a Linear-heavy MLP, the CNN) trained on digits with kubetrain,
run the quantize step with every candidate and report validation accuracy, weight bytes,
batch-1 and batch-64 latency (side by side with fp32: 5 interleaved rounds, median and
min-max; one torch thread) and throughput. Then the compiled fp32 model (torch.compile) is put
beside fp32 eager and the kept int8 model, so a speed-up is not mistaken for a compiler gain.
Last, QAT recovery: the default MLP with 8 hidden units scaled up 100x and the next layer
scaled down 100x (the same fp32 function, but outlier activation channels) under static int8
and then QAT.

    python benchmarks/quantize.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from kubetrain.config import QUANT_CANDIDATES, QuantizeConfig, load_config
from kubetrain.data import build_dataset, load_dataset
from kubetrain.evaluate.measure import compare_latency
from kubetrain.quantize import artifact, load_model, load_quantized, quantize_artifact
from kubetrain.train.distributed import DistContext
from kubetrain.train.loop import fit, save_model

RESULTS = Path(__file__).parent / "results"
MODELS = {
    "mlp (default, 256-128)": ["model.name=mlp", "train.epochs=10"],
    "mlp linear-heavy (3x1024)": [
        "model.name=mlp",
        "model.hidden_sizes=[1024,1024,1024]",
        "train.epochs=6",
    ],
    "cnn (default, 32-64)": ["model.name=cnn", "train.epochs=6"],
}


def train(work: Path, ds: Path, overrides: list[str]) -> Path:
    cfg = load_config(overrides=["train.nproc=1", "tune.enabled=false", *overrides])
    data = load_dataset(ds)
    out = work / "model"
    save_model(fit(cfg, data, DistContext()), cfg, data, out)
    return out


def row(name: str, c: dict) -> str:
    def g(k, f):
        return format(c[k], f) if c.get(k) is not None else "-"

    return (
        f"  {name:26s} acc {g('val_accuracy', '.4f')} drop {g('accuracy_drop', '+.4f')} "
        f"size {g('size_ratio', '.2f')}x  b1 {g('latency_ms_b1', '.3f')} ms "
        f"({g('latency_ratio_b1', '.2f')}x)  b64 {g('latency_ms_b64', '.3f')} ms "
        f"[{g('latency_ms_b64_min', '.3f')}-{g('latency_ms_b64_max', '.3f')}] "
        f"({g('latency_ratio_b64', '.2f')}x)  {g('samples_per_second_b64', '.0f')} samples/s"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kubetrain-qbench-"))
    ds = work / "digits"
    build_dataset(load_config().data, ds)
    data = load_dataset(ds)
    x_val, _ = data.split("val")
    report: dict = {}
    for label, overrides in MODELS.items():
        mdir = train(work / label.split()[0], ds, overrides)
        qcfg = QuantizeConfig(
            auto_candidates=list(QUANT_CANDIDATES), latency_repeats=args.repeats, num_threads=1
        )
        info = quantize_artifact(mdir, ds, work / "q", qcfg)
        print(f"\n{label}: kept {info['name']} — {info['decision'].split(' (others')[0]}")
        print(row("fp32 (eager)", {**info["fp32"], "latency_ratio_b1": 1, "latency_ratio_b64": 1}))
        for c in info["candidates"]:
            print(row(c["name"], c))
        # The compiled fp32 model beside fp32 eager and the kept int8 model.
        runs = {
            "fp32 eager": load_model(mdir),
            "fp32 torch.compile": artifact.Compiled(load_model(mdir)),
            f"kept {info['name']}": load_quantized(work / "q"),
        }
        extra = {}
        for batch in (1, 64):
            lat = compare_latency(runs, x_val, data.input_shape, batch, args.repeats)
            extra[batch] = lat
        base = {b: extra[b]["fp32 eager"]["median"] for b in (1, 64)}
        for name in runs:
            print(f"  {name:26s} b1 {extra[1][name]['median']:.3f} ms "
                  f"({extra[1][name]['median'] / base[1]:.2f}x)  b64 "
                  f"{extra[64][name]['median']:.3f} ms ({extra[64][name]['median'] / base[64]:.2f}x)")  # fmt: skip
        report[label] = {"quant": info, "compiled_comparison": extra}
        shutil.rmtree(work / "q")
    # QAT recovery on outlier channels (scaled 100x and 1000x; QAT lr 1e-4 and 1e-3).
    mdir = work / "mlp" / "model"
    report["qat_recovery"] = []
    print("\nQAT recovery (default mlp, 8 hidden units scaled up by k, next layer down by k):")
    for scale in (100, 1000):
        outlier = work / f"outlier{scale}"
        shutil.copytree(mdir, outlier)
        model = load_model(mdir)
        with torch.no_grad():
            model[1].weight[:8] *= scale
            model[1].bias[:8] *= scale
            model[3].weight[:, :8] /= scale
        torch.save(model.state_dict(), outlier / "model.pt")
        for lr in (1e-4, 1e-3):
            qcfg = QuantizeConfig(
                method="static_int8",
                on_drop="keep_fp32",
                latency_repeats=5,
                qat_epochs=3,
                qat_lr=lr,
            )
            info = quantize_artifact(outlier, ds, work / "q", qcfg)
            static, qat = info["candidates"]
            recovered = 1 - qat["accuracy_drop"] / static["accuracy_drop"]
            print(f"  k={scale:5d} qat_lr={lr:g}: static_int8 drop {static['accuracy_drop']:+.4f}, "
                  f"qat_int8 ({qcfg.qat_epochs} epochs) drop {qat['accuracy_drop']:+.4f}: "
                  f"{recovered:.0%} of the drop recovered; kept {info['name']}")  # fmt: skip
            report["qat_recovery"].append(
                {"scale": scale, "qat_lr": lr, "static": static, "qat": qat, "recovered": recovered}
            )
            shutil.rmtree(work / "q")
    (RESULTS / "quantize.json").write_text(json.dumps(report, indent=1, default=str))
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
