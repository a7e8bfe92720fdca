"""Training-efficiency benchmarks, measured side by side in one run (the machine is shared).

Every comparison is interleaved (A, B, C, A, B, C, ...) and repeated; figures are medians with
min-max. Results go to benchmarks/results/train.json and the "Training" part of RESULTS.md.

    .venv/bin/python benchmarks/train_bench.py [--rounds 5] [--only loop,data_wait,...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kubetrain.core.distributed import DistContext
from kubetrain.data import build_dataset, load_dataset
from kubetrain.launch.local import LocalLauncher
from kubetrain.pipeline.config import load_config
from kubetrain.tasks import open_task
from kubetrain.train.loop import fit

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = Path(tempfile.mkdtemp(prefix="kubetrain-bench-"))


def fmt(s: dict[str, float], scale: float = 1.0, digits: int = 0) -> str:
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f})"


def dataset():
    out = WORK / "digits"
    if not (out / "meta.json").exists():
        build_dataset(load_config().data, out)
    return load_dataset(out)


# -- 1. kubetrain loop vs a minimal hand-written loop vs Lightning ------------------------------
def kubetrain_loop(cfg, data) -> float:
    result = fit(cfg, open_task(cfg, data), DistContext())
    return statistics.median(h.samples_per_second for h in result.history[1:])


def plain_loop(cfg, data, stock: bool = False) -> float:
    """The minimal loop a PyTorch user writes: index, forward, loss, backward, step. With
    ``stock`` its optimizer is ``torch.optim.AdamW(params, lr, weight_decay)`` as users write
    it (PyTorch's default implementation); without, kubetrain's (fused) one, so that only the
    loops differ."""
    from kubetrain.models import build_model
    from kubetrain.train.optim import build_optimizer, build_scheduler

    tc = cfg.train
    x, y = (torch.from_numpy(a) for a in data.split("train"))
    x = x.view(-1, *data.input_shape)
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    if stock:
        assert tc.optimizer == "adamw"
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    else:
        opt = build_optimizer(model.parameters(), tc)
    steps = len(y) // tc.batch_size
    sched = build_scheduler(opt, tc, steps)
    rates = []
    for _ in range(tc.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(y))
        for k in range(steps):
            idx = perm[k * tc.batch_size : (k + 1) * tc.batch_size]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        rates.append(steps * tc.batch_size / (time.perf_counter() - t0))
    return statistics.median(rates[1:])


def plain_stock(cfg, data) -> float:
    return plain_loop(cfg, data, stock=True)


def lightning_loop(cfg, data) -> float:
    """PyTorch Lightning's Trainer on the same model, optimizer, schedule and batches."""
    import lightning as L

    from kubetrain.data.loader import ArrayDataset, GlobalBatchSampler, make_train_loader
    from kubetrain.models import build_model
    from kubetrain.train.optim import build_optimizer, build_scheduler

    tc = cfg.train
    x, y = data.split("train")
    sampler = GlobalBatchSampler(len(y), tc.batch_size, 1, 0, 1, tc.seed)
    loader = make_train_loader(ArrayDataset(x, y, data.input_shape), sampler, 0)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(tc.seed)
            self.net = build_model(cfg.model, data.input_shape, data.num_classes)

        def training_step(self, batch, _):
            xb, yb = batch
            return torch.nn.functional.cross_entropy(self.net(xb), yb)

        def configure_optimizers(self):
            opt = build_optimizer(self.parameters(), tc)
            sched = build_scheduler(opt, tc, sampler.steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    rates: list[float] = []

    class Timer(L.Callback):
        def on_train_epoch_start(self, *_):
            sampler.set_epoch(len(rates))
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, *_):
            rates.append(sampler.steps * tc.batch_size / (time.perf_counter() - self.t0))

    trainer = L.Trainer(
        max_epochs=tc.epochs, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[Timer()], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(Module(), loader)
    return statistics.median(rates[1:])


def bench_loop(data, rounds: int) -> dict[str, Any]:
    try:
        import lightning  # noqa: F401

        loops = {"kubetrain": kubetrain_loop, "plain": plain_loop, "plain_stock": plain_stock,
                 "lightning": lightning_loop}  # fmt: skip
    except ImportError:
        loops = {"kubetrain": kubetrain_loop, "plain": plain_loop, "plain_stock": plain_stock}
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    out = {}
    for name, overrides in {
        "mlp-256-128 batch 64": ["model.hidden_sizes=[256, 128]", "train.batch_size=64"],
        "mlp-1024-1024 batch 256": ["model.hidden_sizes=[1024, 1024]", "train.batch_size=256"],
    }.items():
        cfg = load_config(overrides=["train.nproc=1", "train.epochs=6", *overrides])
        runs: dict[str, list[float]] = {k: [] for k in loops}
        for r in range(rounds):
            order = list(loops)[r % len(loops) :] + list(loops)[: r % len(loops)]
            for key in order:
                runs[key].append(loops[key](cfg, data))
        res = {k: stats(v) for k, v in runs.items()}
        for other in ("plain", "plain_stock"):
            res[f"ratio_kubetrain_vs_{other}"] = stats(
                [a / b for a, b in zip(runs["kubetrain"], runs[other], strict=True)]
            )
        if "lightning" in runs:
            res["ratio_kubetrain_vs_lightning"] = stats(
                [a / b for a, b in zip(runs["kubetrain"], runs["lightning"], strict=True)]
            )
        out[name] = res
    return out


# -- 2. data-wait share with heavy augmentation at num_workers 0/1/2 ---------------------------
def bench_data_wait(data, rounds: int) -> dict[str, Any]:
    res: dict[str, list[float]] = {}
    recipes = {
        "default recipe (MLP)": ["data.augment=false"],
        "default recipe (MLP), no prefetch thread": ["data.augment=false", "data.prefetch=0"],
        "default recipe, CNN": ["data.augment=false", "model.name=cnn"],
    }
    heavy = [
        "data.augment=true",
        "data.augment_shift=2",
        "data.augment_noise=0.1",
        "model.name=cnn",
    ]
    recipes["heavy augmentation, num_workers=0, no prefetch thread"] = [*heavy, "data.prefetch=0"]
    for w in (0, 1, 2):
        recipes[f"heavy augmentation, num_workers={w}"] = [*heavy, f"data.num_workers={w}"]
    for _ in range(rounds):
        for name, overrides in recipes.items():
            cfg = load_config(overrides=["train.nproc=1", "train.epochs=3", *overrides])
            result = fit(cfg, open_task(cfg, data), DistContext())
            res.setdefault(name, []).append(
                statistics.median(h.data_wait_share for h in result.history[1:])
            )
    return {k: stats(v) for k, v in res.items()}


# -- 3. DDP + accumulation: all-reduce count and step time with and without no_sync -------------
def bench_no_sync(data, rounds: int) -> dict[str, Any]:
    res: dict[str, dict[str, list[float]]] = {}
    for round_ in range(rounds):
        for flag in (True, False):
            cfg = load_config(
                overrides=[
                    "train.nproc=2",
                    "train.epochs=4",
                    "train.grad_accum_steps=4",
                    "train.batch_size=256",
                    f"train.no_sync={str(flag).lower()}",
                    "train.checkpoint_every_steps=0",
                    "train.resume=false",
                ]
            )
            out = WORK / f"nosync-{flag}-{round_}"
            LocalLauncher().run(cfg, data.path, out)
            m = json.loads((out / "metrics.json").read_text())
            r = res.setdefault(
                f"no_sync={flag}", {"step_ms": [], "allreduce_calls": [], "comm_s": []}
            )
            r["step_ms"].append(1e3 * m["step_seconds"])
            r["allreduce_calls"].append(m["allreduce_calls"])
            r["comm_s"].append(m["comm_seconds"])
    return {k: {m: stats(v) for m, v in d.items()} for k, d in res.items()}


# -- 4. bf16 vs fp32 on this CPU ------------------------------------------------------------------
def bench_bf16(data, rounds: int) -> dict[str, Any]:
    res: dict[str, dict[str, list[float]]] = {}
    for _ in range(rounds):
        for precision in ("fp32", "bf16"):
            cfg = load_config(
                overrides=["train.nproc=1", "train.epochs=20", f"train.precision={precision}"]
            )
            result = fit(cfg, open_task(cfg, data), DistContext())
            r = res.setdefault(precision, {"step_ms": [], "val_accuracy": []})
            r["step_ms"].append(1e3 * result.summary["step_seconds"])
            r["val_accuracy"].append(result.history[-1].val_accuracy)
    return {k: {m: stats(v) for m, v in d.items()} for k, d in res.items()}


# -- 5. checkpoint cost at the default interval ----------------------------------------------------
def bench_checkpoint(data, rounds: int) -> dict[str, Any]:
    per_ckpt, share = [], []
    for r in range(rounds):
        cfg = load_config(overrides=["train.nproc=1"])  # default epochs and interval
        result = fit(cfg, open_task(cfg, data), DistContext(), checkpoint_dir=WORK / f"ckpt-{r}")
        s = result.summary
        per_ckpt.append(1e3 * s["checkpoint_seconds"] / s["checkpoints_written"])
        share.append(s["checkpoint_seconds"] / (s["train_seconds"] + s["checkpoint_seconds"]))
    return {"ms_per_checkpoint": stats(per_ckpt), "share_of_training_time": stats(share),
            "interval_steps": load_config().train.checkpoint_every_steps}  # fmt: skip


# -- 6. pipeline overhead: `kubetrain run` vs the same steps called in one process ----------------
# The reference: the five steps called one after another in a fresh process that imported their
# libraries first (not timed). A fresh process
# per round, so no round reuses another's in-memory compiled graphs.
REFERENCE = """
import importlib, json, sys, time
from pathlib import Path
t0 = time.perf_counter()
from kubetrain.tune.local import RESULTS_IMPORTS
for module in ("kubetrain.pipeline.steps", "kubetrain.data", "optuna", "torch", "kubetrain.train.loop",
               "kubetrain.tune.local", "kubetrain.launch.local", "kubetrain.quantize",
               "kubetrain.quantize.methods", "kubetrain.tasks.measure", *RESULTS_IMPORTS):
    importlib.import_module(module)
imports = time.perf_counter() - t0
from kubetrain.pipeline import steps
from kubetrain.pipeline.config import load_config
cfg, d, took = load_config(), Path(sys.argv[1]), {}
def timed(name, fn, *args, **kwargs):
    t0 = time.perf_counter()
    fn(cfg, *args, **kwargs)
    took[name] = time.perf_counter() - t0
timed("preprocess", steps.preprocess, d / "ds")
timed("tune", steps.tune, d / "ds", d / "tune")
timed("train", steps.train, d / "ds", d / "model", params_file=d / "tune" / "best_params.json")
timed("quantize", steps.quantize, d / "ds", d / "model", d / "q")
timed("evaluate", steps.evaluate, d / "ds", d / "model", d / "q", d / "eval", d / "tune")
print("STEPS", json.dumps({"imports": imports, "steps": took}))
"""
from common import cpu_model, stats  # noqa: E402 (benchmarks/ is the script's folder)

# kfp.local's per-task wall times: the same reading as the per-task overhead benchmark's.
from pipeline_overhead import task_seconds  # noqa: E402 (benchmarks/ is the script's folder)


def bench_pipeline(rounds: int) -> dict[str, Any]:
    """The default pipeline (what `make run` runs): `kubetrain run --no-cache` (every step a
    fresh KFP task process, as a pod) and REFERENCE; interleaved, one of each per round.
    Per-task overhead: benchmarks/pipeline_overhead.py."""
    exe = Path(sys.executable).parent / "kubetrain"
    walls: dict[str, list[float]] = {"run": []}
    tasks: dict[str, dict[str, list[float]]] = {"run": {}}
    sums, scripts, imports, per_step = [], [], [], {}
    for r in range(rounds):
        for mode, flags in (("run", []),):  # one mode since the step server went; keys kept
            t0 = time.perf_counter()
            done = subprocess.run(
                [str(exe), "run", "--no-cache", "--output", str(WORK / f"pipe-{mode}-{r}"), *flags],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            walls[mode].append(time.perf_counter() - t0)
            kfp_log = (WORK / f"pipe-{mode}-{r}" / "logs" / "pipeline.log").read_text()
            for name, sec in task_seconds(kfp_log).items():
                tasks[mode].setdefault(name, []).append(sec)
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", REFERENCE, str(WORK / f"steps-{r}")],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        scripts.append(time.perf_counter() - t0)
        found = json.loads(done.stdout.split("STEPS", 1)[1])
        imports.append(found["imports"])
        for name, sec in found["steps"].items():
            per_step.setdefault(name, []).append(sec)
        sums.append(sum(found["steps"].values()))
    out: dict[str, Any] = {"steps_in_one_process_s": stats(sums), "overrides": [],
                           "step_s": {k: stats(v) for k, v in per_step.items()}}  # fmt: skip
    out["script_wall_s"], out["script_imports_s"] = stats(scripts), stats(imports)
    for mode, w in walls.items():
        out[f"run_wall_{mode}_s"] = stats(w)
        out[f"overhead_share_{mode}"] = stats([1 - s / x for s, x in zip(sums, w, strict=True)])
        out[f"overhead_vs_script_{mode}"] = stats(
            [1 - s / x for s, x in zip(scripts, w, strict=True)]
        )
        out[f"task_s_{mode}"] = {k: stats(v) for k, v in tasks[mode].items()}
    return out


BENCHES = {
    "loop": bench_loop,
    "data_wait": bench_data_wait,
    "no_sync": bench_no_sync,
    "bf16": bench_bf16,
    "checkpoint": bench_checkpoint,
}


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def render(results: dict[str, Any]) -> str:
    lines = ["## Training efficiency", "", f"Machine: {results['machine']}", "",
             "Each part and the run that measured it (`--only` refreshes parts, keeps the rest):", ""]  # fmt: skip
    lines += [f"- {name}: {how}" for name, how in results.get("runs", {}).items()]
    lines.append("")
    if "loop" in results:
        lines += ["### Training loop throughput (samples/s, median (min–max) of rounds; epochs 2+)", "",
                  "*plain*: a minimal hand-written loop with kubetrain's optimizer (fused AdamW), so "
                  "only the loops differ; *plain, stock AdamW*: the same loop with "
                  "`torch.optim.AdamW(params, lr, weight_decay)` as users write it. Lightning "
                  "runs kubetrain's optimizer and batches.", "",
                  "| model | kubetrain | plain | plain, stock AdamW | Lightning | kubetrain / plain "
                  "| kubetrain / plain, stock | kubetrain / Lightning |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in results["loop"].items():
            light = fmt(r["lightning"]) if "lightning" in r else "not installed"
            ratio_l = fmt(r["ratio_kubetrain_vs_lightning"], digits=3) if "lightning" in r else "–"
            lines.append(f"| {name} | {fmt(r['kubetrain'])} | {fmt(r['plain'])} | "
                         f"{fmt(r['plain_stock'])} | {light} | "
                         f"{fmt(r['ratio_kubetrain_vs_plain'], digits=3)} | "
                         f"{fmt(r['ratio_kubetrain_vs_plain_stock'], digits=3)} | {ratio_l} |")  # fmt: skip
        lines.append("")
    if "data_wait" in results:
        lines += [
            "### Data-wait share of step time (1 process; epochs 2+)",
            "",
            "| recipe | share |",
            "|---|---|",
        ]
        lines += [f"| {k} | {fmt(v, 100, 1)} % |" for k, v in results["data_wait"].items()]
        lines.append("")
    if "no_sync" in results:
        lines += ["### DDP (2 processes) with 4 accumulation micro-steps", "",
                  "| | all-reduce calls | comm. time (s) | step time (ms) |", "|---|---|---|---|"]  # fmt: skip
        for k, v in results["no_sync"].items():
            lines.append(f"| {k} | {fmt(v['allreduce_calls'])} | {fmt(v['comm_s'], digits=3)} | "
                         f"{fmt(v['step_ms'], digits=2)} |")  # fmt: skip
        lines.append("")
    if "bf16" in results:
        lines += ["### bf16 autocast vs fp32 on this CPU (1 process, 20 epochs)", "",
                  "| precision | step time (ms) | val accuracy |", "|---|---|---|"]  # fmt: skip
        for k, v in results["bf16"].items():
            lines.append(
                f"| {k} | {fmt(v['step_ms'], digits=2)} | {fmt(v['val_accuracy'], digits=4)} |"
            )
        lines.append("")
    if "checkpoint" in results:
        c = results["checkpoint"]
        lines += ["### Checkpoint cost (default interval: every "
                  f"{c['interval_steps']} steps and at the end)", "",
                  f"- per checkpoint: {fmt(c['ms_per_checkpoint'], digits=2)} ms",
                  f"- share of training time: {fmt(c['share_of_training_time'], 100, 2)} %", ""]  # fmt: skip
    # (A pipeline result saved before the step server was retired has other keys: not shown.)
    if "run_wall_run_s" in results.get("pipeline", {}):
        p = results["pipeline"]
        lines += ["### Pipeline overhead (the default pipeline: `kubetrain run --no-cache` vs the same "
                  "five steps called in one process)", "",
                  "Two references, both a fresh Python process per round that imports the steps' "
                  "libraries, then calls the five steps one after another:", "",
                  "- *steps' compute*: the time inside the five step calls only (imports, interpreter "
                  "start and exit not counted) — the strictest reading of the target;",
                  "- *one script*: that process's whole wall time, imports included — what the same "
                  "work costs as one hand-written Python script.", "",
                  "Overhead share = 1 − reference / `kubetrain run` wall time.", "",
                  f"- steps' compute: {fmt(p['steps_in_one_process_s'], 1, 1)} s; one script: "
                  + (f"{fmt(p['script_wall_s'], 1, 1)} s (of it imports {fmt(p['script_imports_s'], 1, 1)} s)"
                     if "script_wall_s" in p else "not measured"),
                  f"- `kubetrain run` (each task a fresh process): {fmt(p['run_wall_run_s'], 1, 1)} s;"
                  f" overhead share vs steps' compute {fmt(p['overhead_share_run'], 100, 1)} %"
                  + (f", vs one script {fmt(p['overhead_vs_script_run'], 100, 1)} %" if "script_wall_s" in p else ""),
                  ""]  # fmt: skip
        if "step_s" in p:
            lines += ["| step | in one process (s) | KFP task (s) |", "|---|---|---|"]
            for name in p["task_s_run"]:
                ref = p["step_s"].get(name)
                lines.append(f"| {name} | {fmt(ref, 1, 2) if ref else '–'} | "
                             f"{fmt(p['task_s_run'][name], 1, 2)} |")  # fmt: skip
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--only", default="", help="comma-separated: " + ",".join([*BENCHES, "pipeline"])
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # one thread per process: every contender gets the same
    os.environ["KUBETRAIN_PROGRESS"] = "0"
    chosen = [b for b in args.only.split(",") if b] or [*BENCHES, "pipeline"]
    data = dataset()
    results: dict[str, Any] = {}
    if args.only and (RESULTS / "train.json").exists():  # refresh some, keep the others
        results = json.loads((RESULTS / "train.json").read_text())
    results["machine"] = machine()
    for name in chosen:
        started = time.perf_counter()
        if name == "pipeline":
            results[name] = bench_pipeline(args.rounds)
        else:
            results[name] = BENCHES[name](data, args.rounds)
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
        command = "python benchmarks/train_bench.py " + " ".join(sys.argv[1:])
        results.setdefault("runs", {})[name] = (
            f"`{command.strip()}` at {results['machine']['date']} on {results['machine']['cpu']}"
        )
        write(results)  # after each benchmark: a late failure keeps what was measured


def write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(results, indent=2))
    section = render(results)
    (RESULTS / "train.md").write_text(section)
    print(section)


if __name__ == "__main__":
    main()
