"""Cost as the work grows: preprocess fanned out, preprocess at 1x/4x/16x the data, training on
1 and 2 processes, and the default pipeline against dataset size.

    .venv/bin/python benchmarks/preprocess_scaling.py [--rounds 3] [--quick] [--only ...]

Text jobs run in this interpreter (tokenizers), image jobs in ``--vision-python`` (torchvision;
``.venv-vision`` by default), each in a fresh process.

Parts (``--only`` takes a comma list):

- ``fanout``: preprocess of generated JPEG images (64-96 px, resized to 64) and of generated text
  (BPE tokenizer) as plan -> convert x N -> merge, N = 1 and 2 convert tasks, each a process of
  its own with one core (``data.num_workers=0``), as pods would be; interleaved and repeated.
  images/s and tokens/s of the convert phase, plan and merge time apart; the per-core rate is
  N = 1's, and a 16-core pod's is projected from it and the measured N = 2 efficiency.
- ``growth``: the one-task preprocess (``build_image_dataset``, ``build_text_dataset``) of 1x, 4x
  and 16x a base size, each in a fresh process: wall time and peak RSS (time should grow
  linearly, memory stay flat: a worker holds one shard).
- ``train``: training samples/s of a small Transformer on the text dataset, 1 and 2 torchrun
  processes (``kubetrain.launch``), interleaved.
- ``pipeline``: ``kubetrain run`` wall time with the defaults (``--pipeline-config``; ``smoke``
  under ``--quick``) on the digits table repeated 1x/4x/16x with jitter.

Writes ``benchmarks/results/preprocess_scaling.{md,json,png}`` and prints the table. ``--quick``
checks that everything runs at small sizes (its figures mean nothing). On a shared machine read
the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import cpu_model, stats  # noqa: E402

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "hex",
    "jovial",
    "boxers",
    "and",
    "their",
    "zebras",
    "graze",
    "near",
    "old",
    "mills",
    "under",
    "pale",
    "skies",
    "as",
    "ten",
    "bright",
    "stars",
    "fade",
    "into",
    "morning",
    "light",
]


# -- data ---------------------------------------------------------------------------------------
def image_source(num_images: int, work: Path) -> Path:
    """A folder of ``num_images`` generated JPEGs in 10 classes (cached between runs)."""
    from vision_common import image_folder

    return image_folder(num_images=num_images, classes=10, min_px=64, max_px=96)


def text_source(rows: int, work: Path) -> Path:
    """A CSV of ``rows`` generated sentences (5-40 words) with one of 10 labels."""
    import numpy as np
    import pandas as pd

    path = work / f"text-{rows}.csv"
    if not path.exists():
        rng = np.random.default_rng(rows)
        words = np.array(WORDS)
        lengths = rng.integers(5, 40, rows)
        texts = [" ".join(words[rng.integers(0, len(words), n)]) for n in lengths]
        labels = rng.integers(0, 10, rows).astype(str)
        pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return path


def data_config(kind: str, source: Path, **kw: Any):
    from kubetrain.data.config import DataConfig

    if kind == "images":
        return DataConfig(source=str(source), image_size=64, shard_samples=256, **kw)
    return DataConfig(
        source=str(source), task="text_classification", max_length=64, shard_samples=2048,
        tokenizer={"vocab_size": 2000}, **kw,
    )  # fmt: skip


# -- one measured job in a fresh process ---------------------------------------------------------
def job(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` in this process (called with ``--job``): a plan, one convert task, a merge,
    or a whole one-task build; returns its seconds, what it made and its peak RSS."""
    from kubetrain.data.config import DataConfig

    cfg = DataConfig.model_validate(spec["config"])
    started = time.perf_counter()
    out: dict[str, Any] = {}
    if spec["what"] == "plan":
        from kubetrain.tasks import plan_dataset

        plan = plan_dataset(cfg, spec["plan"], spec["tasks"])
        out["samples"] = sum(s.samples for s in plan.slots)
    elif spec["what"] == "convert":
        from kubetrain.tasks import convert_range

        part = convert_range(spec["plan"], spec["task"], spec["out"])
        out["work_s"] = part.seconds  # decoding/tokenizing and writing: no imports
        out["samples"] = sum(r.samples for r in part.slots)
        out["tokens"] = sum(r.tokens for r in part.slots)
    elif spec["what"] == "merge":
        from kubetrain.tasks import merge_dataset

        out["version"] = merge_dataset(spec["plan"], spec["parts"], spec["out"]).version
    elif spec["what"] == "build" and cfg.task == "classification":
        from kubetrain.data.images import build_image_dataset

        manifest = build_image_dataset(cfg, spec["out"])
        out["samples"] = sum(manifest.num_samples(s) for s in manifest.splits)
    else:
        from kubetrain.data.text import build_text_dataset

        meta = build_text_dataset(cfg, spec["out"])
        out["samples"], out["tokens"] = sum(meta.samples.values()), sum(meta.tokens.values())
    out["seconds"] = time.perf_counter() - started
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def start(spec: dict[str, Any]) -> subprocess.Popen:
    """``spec`` as a job in a process of its own, under the interpreter ``spec["python"]``
    (images need torchvision's venv, text the core one's tokenizers)."""
    python = spec.get("python") or sys.executable
    return subprocess.Popen(
        [python, __file__, "--job", json.dumps(spec)], stdout=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen) -> dict[str, Any]:
    stdout, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"a benchmark job failed (exit {proc.returncode})")
    return json.loads(stdout.strip().splitlines()[-1])


def run(spec: dict[str, Any]) -> dict[str, Any]:
    return finish(start(spec))


# -- parts --------------------------------------------------------------------------------------
def fanout_once(kind: str, source: Path, tasks: int, work: Path, python: str) -> dict[str, float]:
    """plan -> N convert processes at once -> merge; each phase's wall time."""
    shutil.rmtree(work, ignore_errors=True)
    config = data_config(kind, source, num_workers=0).model_dump(mode="json")
    common = {"config": config, "plan": str(work / "plan"), "python": python}
    plan = run({"what": "plan", "tasks": tasks, **common})
    parts = [str(work / f"part-{k}") for k in range(tasks)]
    began = time.perf_counter()
    procs = [start({"what": "convert", "task": k, "out": parts[k], **common}) for k in range(tasks)]
    converted = [finish(p) for p in procs]
    convert_wall = time.perf_counter() - began
    merged = run({"what": "merge", "parts": parts, "out": str(work / "dataset"), **common})
    return {
        "plan_s": plan["seconds"],
        "convert_s": max(c["work_s"] for c in converted),  # the slowest range, work only
        "convert_wall_s": convert_wall,  # with each process's start and imports
        "merge_s": merged["seconds"],
        "samples": sum(c["samples"] for c in converted),
        "tokens": sum(c.get("tokens", 0) for c in converted),
        "version": merged["version"],
    }


def part_fanout(args, work: Path) -> dict[str, Any]:
    sources = {
        "images": image_source(args.images, work),
        "text": text_source(args.rows, work),
    }
    raw: dict[str, dict[int, list[dict]]] = {k: {1: [], 2: []} for k in sources}
    for _ in range(args.rounds):
        for kind, source in sources.items():
            for n in (1, 2):
                python = args.vision_python if kind == "images" else sys.executable
                raw[kind][n].append(fanout_once(kind, source, n, work / f"fan-{kind}-{n}", python))
    out: dict[str, Any] = {}
    for kind, by_n in raw.items():
        versions = {r["version"] for rs in by_n.values() for r in rs}
        unit = "samples" if kind == "images" else "tokens"
        rates = {n: stats([r[unit] / r["convert_s"] for r in rs]) for n, rs in by_n.items()}
        per_core = rates[1]["median"]
        efficiency = rates[2]["median"] / (2 * per_core)
        plan_s = stats([r["plan_s"] for rs in by_n.values() for r in rs])["median"]
        start_s = stats([r["convert_wall_s"] - r["convert_s"] for r in by_n[1]])["median"]
        merge_s = stats([r["merge_s"] for rs in by_n.values() for r in rs])["median"]
        out[kind] = {
            "unit": "images/s" if kind == "images" else "tokens/s",
            "rate_n1": rates[1], "rate_n2": rates[2], "efficiency_n2": efficiency,
            "per_core": per_core, "pod16": per_core * 16,
            "plan_s": plan_s, "merge_s": merge_s, "start_s": start_s,
            "same_version": len(versions) == 1,
            "samples": by_n[1][0]["samples"], "tokens": by_n[1][0]["tokens"],
        }  # fmt: skip
    return out


def part_growth(args, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("images", "text"):
        rows = []
        for scale in args.scales:
            size = (args.images if kind == "images" else args.rows) * scale
            source = image_source(size, work) if kind == "images" else text_source(size, work)
            config = data_config(kind, source, num_workers=0).model_dump(mode="json")
            shutil.rmtree(work / "grow", ignore_errors=True)
            python = args.vision_python if kind == "images" else sys.executable
            got = run(
                {"what": "build", "config": config, "out": str(work / "grow"), "python": python}
            )
            rows.append({"scale": scale, "size": size, **got})
        out[kind] = rows
    return out


def part_train(args, work: Path) -> dict[str, Any]:
    from kubetrain.core.records import TrainSummary
    from kubetrain.launch import get_launcher
    from kubetrain.pipeline.config import load_config
    from kubetrain.tasks import build_dataset

    source = text_source(args.rows, work)
    base = [
        f"data.source={source}", "data.task=text_classification", "data.max_length=64",
        "data.tokenizer.vocab_size=2000", "model.name=transformer", "model.d_model=64",
        "model.heads=2", "model.layers=2", "model.ff=128", "train.epochs=1",
        "train.batch_size=64", "tune.enabled=false", "train.checkpoint_every_steps=100000",
    ]  # fmt: skip
    dataset = work / "train-ds"
    shutil.rmtree(dataset, ignore_errors=True)
    build_dataset(load_config(None, base).data, dataset)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for nproc in (1, 2):
            cfg = load_config(None, [*base, f"train.nproc={nproc}"])
            out = work / f"model-{nproc}"
            shutil.rmtree(out, ignore_errors=True)
            get_launcher(cfg).run(cfg, dataset, out)
            summary = TrainSummary.read(out / "metrics.json")
            rates[nproc].append(summary.samples_per_second)
    return {str(n): stats(r) for n, r in rates.items()}


def digits_csv(scale: int, work: Path) -> Path:
    """scikit-learn's digits repeated ``scale`` times, each copy with +-1 jitter."""
    import numpy as np
    import pandas as pd
    from sklearn.datasets import load_digits

    path = work / f"digits-{scale}.csv"
    if not path.exists():
        x, y = load_digits(return_X_y=True)
        rng = np.random.default_rng(scale)
        copies = [np.clip(x + rng.integers(-1, 2, x.shape) * (k > 0), 0, 16) for k in range(scale)]
        table = pd.DataFrame(np.concatenate(copies), columns=[f"p{i}" for i in range(64)])
        table["label"] = np.tile(y, scale)
        table.to_csv(path, index=False)
    return path


def part_pipeline(args, work: Path) -> list[dict[str, Any]]:
    rows = []
    for scale in args.scales:
        source = digits_csv(scale, work)
        out = work / f"run-{scale}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "kubetrain.cli", "run", "--no-cache", "--output", str(out),
               "--set", f"data.source={source}"]  # fmt: skip
        if args.pipeline_config:
            cmd[4:4] = ["--config", args.pipeline_config]
        began = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"kubetrain run failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        rows.append({"scale": scale, "rows": 1797 * scale, "seconds": time.perf_counter() - began})
    return rows


# -- report -------------------------------------------------------------------------------------
def report(results: dict[str, Any], args) -> str:
    machine = results["machine"]
    lines = [
        "## Preprocess scaling (`benchmarks/preprocess_scaling.py`)",
        "",
        f"`{results['command']}` on {machine['cpu']}, {machine['cores']} cores (load "
        f"{machine['load']:.1f} at the start), {machine['date']}."
        + (" **--quick: a check that it runs; the figures mean nothing.**" if args.quick else ""),
    ]
    if machine["load"] > 0.5 * (machine["cores"] or 1):
        lines += ["", f"**Measured on a shared machine (load {machine['load']:.1f} on "
                  f"{machine['cores']} cores): two tasks competed with other work, so the N = 2 "
                  "figures and the efficiency understate what two idle cores do; re-time it on "
                  "an idle machine.**"]  # fmt: skip
    if "fanout" in results:
        lines += ["", "Preprocess fanned out: plan -> N convert processes (1 core each) -> merge; "
                  "the convert phase's rate (samples or tokens over the slowest range's own "
                  "time: a task's start and imports apart), median (min-max) of "
                  f"{args.rounds} round(s). A 16-core pod is the per-core rate (N = 1's) x 16: "
                  "convert tasks share nothing, so the rate adds up over cores and pods as far "
                  "as the source and the store keep up; the N = 2 efficiency measured here says "
                  "how far two tasks on this machine were from that.", "",
                  "| data | N = 1 | N = 2 | N = 2 / (2 x N = 1) | plan s | merge s | task start s "
                  "| 16-core pod (per-core x 16) | same version |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for kind, r in results["fanout"].items():
            lines.append(
                f"| {kind} ({r['samples']} samples) | {fmt(r['rate_n1'])} {r['unit']} | "
                f"{fmt(r['rate_n2'])} | {r['efficiency_n2']:.2f} | {r['plan_s']:.1f} | "
                f"{r['merge_s']:.1f} | {r['start_s']:.1f} | {r['pod16']:,.0f} {r['unit']} | "
                f"{r['same_version']} |"
            )
    if "growth" in results:
        lines += ["", "One-task preprocess (one process, `data.num_workers=0`) of 1x, 4x and 16x "
                  "the data: wall time and peak RSS. What grows with the data in memory: the "
                  "plan's listing (images: a few hundred bytes an image) and, for text, the "
                  "tokenizer's sample until it holds `data.tokenizer.sample_size` rows; the "
                  "conversion holds one shard.", "",
                  "| data | scale | samples | seconds | s per 1000 samples | peak RSS MB |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for kind, rows in results["growth"].items():
            for r in rows:
                lines.append(
                    f"| {kind} | {r['scale']}x | {r['samples']} | {r['seconds']:.1f} | "
                    f"{1000 * r['seconds'] / max(r['samples'], 1):.2f} | {r['peak_rss_mb']:.0f} |"
                )
    if "train" in results:
        t = results["train"]
        lines += ["", "Training samples/s (Transformer d=64 on the text data, 1 epoch): "
                  f"1 process {fmt(t['1'])}, 2 processes {fmt(t['2'])} "
                  f"(x{t['2']['median'] / t['1']['median']:.2f})."]  # fmt: skip
    if "pipeline" in results:
        config = args.pipeline_config or "the defaults"
        lines += ["", f"`kubetrain run --no-cache` ({config}) on the digits table repeated:", "",
                  "| scale | rows | seconds |", "|---|---|---|"]  # fmt: skip
        lines += [
            f"| {r['scale']}x | {r['rows']} | {r['seconds']:.0f} |" for r in results["pipeline"]
        ]
    lines += ["", "![preprocess scaling](results/preprocess_scaling.png)"]
    return "\n".join(lines) + "\n"


def fmt(s: dict[str, float]) -> str:
    return f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for kind, rows in results.get("growth", {}).items():
        sizes = [r["samples"] for r in rows]
        axes[0].plot(sizes, [r["seconds"] for r in rows], "o-", label=kind)
        axes[1].plot(sizes, [r["peak_rss_mb"] for r in rows], "o-", label=kind)
    axes[0].set(
        title="preprocess wall time", xlabel="samples", ylabel="s", xscale="log", yscale="log"
    )
    axes[1].set(title="preprocess peak RSS", xlabel="samples", ylabel="MB", xscale="log")
    if "pipeline" in results:
        rows = results["pipeline"]
        axes[2].plot(
            [r["rows"] for r in rows], [r["seconds"] for r in rows], "o-", label="pipeline"
        )
        axes[2].set(title="kubetrain run wall time", xlabel="table rows", ylabel="s", xscale="log")
    axes[1].set_ylim(bottom=0)  # flat is what to see
    axes[2].set_ylim(bottom=0)
    for ax in axes:
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if ax.lines:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument(
        "--report-only", action="store_true", help="re-render the saved results' table and plot"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round")
    parser.add_argument("--only", default="fanout,growth,train,pipeline")
    parser.add_argument("--images", type=int, default=2000, help="base number of images")
    parser.add_argument("--rows", type=int, default=20000, help="base number of text rows")
    parser.add_argument("--pipeline-config", default="", help="a recipe for the pipeline part")
    parser.add_argument(
        "--vision-python", default=str(HERE.parent / ".venv-vision" / "bin" / "python"),
        help="the interpreter of the image jobs (torchvision's venv)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.job:
        print(json.dumps(job(json.loads(args.job))))
        return
    args.scales = [1, 4, 16]
    if args.report_only:
        results = json.loads((RESULTS / "preprocess_scaling.json").read_text())
        args.rounds, args.quick = results["rounds"], results["quick"]
        args.pipeline_config = results.get("pipeline_config", "")
        plot(results, RESULTS / "preprocess_scaling.png")
        (RESULTS / "preprocess_scaling.md").write_text(report(results, args))
        return
    if args.quick:
        args.rounds, args.images, args.rows, args.scales = 1, 200, 2000, [1, 4]
        args.pipeline_config = args.pipeline_config or "smoke"
    results: dict[str, Any] = {
        "machine": {
            "cpu": cpu_model(), "cores": os.cpu_count(), "load": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "command": " ".join(["python", "benchmarks/preprocess_scaling.py", *sys.argv[1:]]),
        "rounds": args.rounds, "quick": args.quick, "pipeline_config": args.pipeline_config,
    }  # fmt: skip
    parts = {"fanout": part_fanout, "growth": part_growth, "train": part_train,
             "pipeline": part_pipeline}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kubetrain-scaling-") as tmp:
        for name in args.only.split(","):
            print(f"-- {name}", flush=True)
            results[name] = parts[name](args, Path(tmp))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "preprocess_scaling.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "preprocess_scaling.png")
    text = report(results, args)
    (RESULTS / "preprocess_scaling.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
