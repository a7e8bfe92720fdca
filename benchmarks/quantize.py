"""Quantization benchmark: every method on three models, what ``auto`` keeps, QAT recovery.

For each model (the default MLP, a Linear-heavy MLP, the CNN) trained on digits with kubetrain,
run the quantize step with every candidate and report validation accuracy, weight bytes,
batch-1 and batch-64 latency (side by side with fp32: 5 interleaved rounds, median and
min-max; one torch thread) and throughput. Then the compiled fp32 model (torch.compile) is put
beside fp32 eager and the kept int8 model, so a speed-up is not mistaken for a compiler gain.
Last, QAT recovery: the default MLP (training seeds 0-2) with 8 hidden units scaled up k times
and the next layer scaled down k times (the same fp32 function, but outlier activation channels;
k = 30, 100, 300, 1000) under static int8, QAT, and QAT with min-max activation ranges (the
ablation of QAT's range search); accuracy on validation and on the held-out test split.

    python benchmarks/quantize.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from kubetrain.core.distributed import DistContext
from kubetrain.data import build_dataset, load_dataset
from kubetrain.pipeline.config import load_config
from kubetrain.quantize import artifact, load_model, load_quantized, methods, quantize_artifact
from kubetrain.quantize.config import CANDIDATES, QuantizeConfig
from kubetrain.tasks import open_task
from kubetrain.tasks.measure import compare_latency, predict
from kubetrain.train.loop import fit, save_model

RESULTS = Path(__file__).parent / "results"
MLP = "mlp (default, 256-128)"
MODELS = {
    MLP: ["model.name=mlp", "train.epochs=10"],
    "mlp linear-heavy (3x1024)": [
        "model.name=mlp",
        "model.hidden_sizes=[1024,1024,1024]",
        "train.epochs=6",
    ],
    "cnn (default, 32-64)": ["model.name=cnn", "train.epochs=6"],
}
QAT_SCALES = (30, 100, 300, 1000)
BUDGET = QuantizeConfig().max_accuracy_drop


def train(work: Path, ds: Path, overrides: list[str]) -> Path:
    cfg = load_config(overrides=["train.nproc=1", "tune.enabled=false", *overrides])
    data = load_dataset(ds)
    out = work / "model"
    task = open_task(cfg, data)
    save_model(fit(cfg, task, DistContext()), cfg, task, out)
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


def outlier_model(mdir: Path, out: Path, scale: float) -> Path:
    """The model in ``mdir`` with 8 hidden units scaled up and the next layer's inputs from
    them scaled down by ``scale``: the same fp32 function (ReLU is positively homogeneous), but
    outlier channels in the activation that int8 quantizes with one per-tensor scale."""
    shutil.copytree(mdir, out)
    model = load_model(mdir)
    with torch.no_grad():
        model[1].weight[:8] *= scale
        model[1].bias[:8] *= scale
        model[3].weight[:, :8] /= scale
    torch.save(model.state_dict(), out / "model.pt")
    return out


def qat_recovery(work: Path, ds: Path, seeds: list[int], trained: dict[str, Path]) -> dict:
    """static_int8 vs qat_int8 (range search, and minmax ranges as the ablation) on outlier
    models: accuracy drop against fp32 on validation (what the gate sees) and test (held out),
    for several scales and training seeds; the share of a static drop > 0.5 point recovered."""
    data = load_dataset(ds)
    splits = {name: data.split(name) for name in ("val", "test")}
    variants = {
        "static_int8": ("static_int8/x86_inductor", {}),
        "qat_int8": ("qat_int8/x86_inductor", {}),
        "qat_int8 minmax ranges": ("qat_int8/x86_inductor", {"qat_activation_ranges": "minmax"}),
    }
    x_train, y_train = data.split("train")
    rows = []
    print(
        "\nQAT recovery (default mlp, 8 hidden units scaled up by k, next layer down by k; "
        "accuracy drop against fp32, val / test; recovered = 1 - qat drop / static drop):"
    )
    for seed in seeds:
        base = trained.get(MLP) if seed == 0 else None  # seed 0: trained above
        if base is None:
            base = train(work / f"mlp-seed{seed}", ds, [*MODELS[MLP], f"train.seed={seed}"])
        for scale in QAT_SCALES:
            src = outlier_model(base, work / f"outlier-{seed}-{scale}", scale)
            model = load_model(src)
            fp32 = {s: _accuracy(model, *xy, data.input_shape) for s, xy in splits.items()}
            row = {"seed": seed, "scale": scale, "fp32": fp32}
            for label, (name, extra) in variants.items():
                qcfg = QuantizeConfig(**extra)
                cdir = work / "cand"
                info = methods.build(name, model, x_train, y_train, data.input_shape, qcfg, cdir)
                runnable, _ = artifact.load_artifact(cdir)
                acc = {s: _accuracy(runnable, *xy, data.input_shape) for s, xy in splits.items()}
                row[label] = {
                    "accuracy": acc,
                    "drop": {s: fp32[s] - acc[s] for s in splits},
                    "quantize_seconds": info["quantize_seconds"],
                    **({"qat": info["qat"]} if "qat" in info else {}),
                }
                shutil.rmtree(cdir)
            for label in variants:
                if label != "static_int8":
                    row[label]["recovered"] = {
                        s: 1 - row[label]["drop"][s] / row["static_int8"]["drop"][s]
                        if row["static_int8"]["drop"][s] > BUDGET
                        else None
                        for s in splits
                    }
            rows.append(row)
            print(_recovery_line(row, variants))
    summary = {}
    for label in list(variants)[1:]:
        for s in splits:
            rec = [r[label]["recovered"][s] for r in rows if r[label]["recovered"][s] is not None]
            summary[f"{label} {s}"] = {
                "cases": len(rec),
                "recovered_half": sum(v >= 0.5 - 1e-9 for v in rec),
            }
    print("  static drop > 0.5 point, cases where at least half of it is recovered: " + "; ".join(
        f"{k} {v['recovered_half']}/{v['cases']}" for k, v in summary.items()))  # fmt: skip
    return {"rows": rows, "summary": summary}


def _accuracy(model, x, y, input_shape) -> float:
    return float((predict(model, x, input_shape) == y).mean())


def _recovery_line(row: dict, variants: dict) -> str:
    def drops(label: str) -> str:
        d = row[label]["drop"]
        return f"{d['val']:+.4f} / {d['test']:+.4f}"

    def rec(label: str) -> str:
        r = row[label]["recovered"]
        return " / ".join("n/a" if r[s] is None else f"{r[s]:.0%}" for s in ("val", "test"))

    qat = row["qat_int8"]
    return (
        f"  seed {row['seed']} k={row['scale']:<5g} static {drops('static_int8')}  qat "
        f"{drops('qat_int8')} (recovered {rec('qat_int8')}; {qat['quantize_seconds']:.1f} s)"
        f"  minmax-range qat {drops('qat_int8 minmax ranges')} "
        f"(recovered {rec('qat_int8 minmax ranges')})"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument(
        "--qat-only", action="store_true", help="only the QAT recovery part (prints, saves nothing)"
    )
    ap.add_argument("--qat-seeds", default="0,1,2", help="training seeds of the QAT models")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    # inductor's int8 lowering, once per compiled graph; nothing to act on here
    warnings.filterwarnings("ignore", message="To copy construct from a tensor")
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kubetrain-qbench-"))
    ds = work / "digits"
    build_dataset(load_config().data, ds)
    data = load_dataset(ds)
    x_val, _ = data.split("val")
    report: dict = {}
    trained: dict[str, Path] = {}
    for label, overrides in {} if args.qat_only else MODELS.items():
        # one folder per model (not per label's first word: both MLPs' labels start "mlp")
        mdir = trained[label] = train(work / f"model{len(trained)}", ds, overrides)
        qcfg = QuantizeConfig(
            auto_candidates=list(CANDIDATES), latency_repeats=args.repeats, num_threads=1
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
    seeds = [int(v) for v in args.qat_seeds.split(",")]
    report["qat_recovery"] = qat_recovery(work, ds, seeds, trained)
    if not args.qat_only:
        (RESULTS / "quantize.json").write_text(json.dumps(report, indent=1, default=str))
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
