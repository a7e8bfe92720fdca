"""Search benchmark: samplers at equal trial budgets, early stopping on vs off.

Method (so that many seeds fit in minutes on 2 cores):

1. Train every configuration of a grid once, for real, with kubetrain's training loop on the
   bundled digits (1 process, 1 thread, trial_epochs epochs, training seed 0), and record each
   configuration's per-epoch validation accuracy. Cached in ``benchmarks/results/search_grid.json``.
2. Run each sampler (``kubetrain.tune.space.make_sampler``, i.e. exactly the Katib -> Optuna
   mapping the tune step uses) against the cache: a sampler proposes parameters from the Katib
   space (log-uniform learning rate, categorical rest), the proposal is snapped to the nearest
   grid point, and that configuration's recorded curve is its result. Grid search walks the grid
   (``GridSampler``, shuffled by its seed).
3. Metric: trials needed until the best value so far is within 0.5 point of the grid's best.
   Median (min-max) over seeds. cmaes and sobol handle only the learning rate (see SAMPLERS).
4. Early stopping: the same proposals (random sampler: proposals do not depend on results)
   with medianstop / hyperband pruning from the recorded per-epoch curves vs without; total
   trial-epochs spent and best accuracy found, per seed.

    python benchmarks/search.py [--seeds 10] [--budget 40] [--retrain]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna

from kubetrain.pipeline.config import load_config
from kubetrain.tasks import open_task
from kubetrain.tune.local import STUDY_NAME
from kubetrain.tune.space import make_pruner, make_sampler

RESULTS = Path(__file__).parent / "results"
LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]
WDS = [0.0, 1e-4, 1e-3]
WIDTHS = [16, 64, 256]
OPTIMIZERS = ["sgd", "adamw"]
EPOCHS = 4
# cmaes and sobol (Optuna's CmaEsSampler, QMCSampler) sample only float/int parameters; the
# categorical ones here (weight decay, width, optimizer) come from their independent random
# sampler, so both search the learning rate alone and draw the rest at random.
SAMPLERS = ("grid", "random", "tpe", "multivariate-tpe", "bayesianoptimization", "cmaes", "sobol")
SPACE = [
    {"name": "train.lr", "parameterType": "double",
     "feasibleSpace": {"min": 1e-4, "max": 1e-1, "distribution": "logUniform"}},
    {"name": "train.weight_decay", "parameterType": "categorical", "feasibleSpace": {"list": WDS}},
    {"name": "model.hidden_sizes.0", "parameterType": "categorical",
     "feasibleSpace": {"list": WIDTHS}},
    {"name": "train.optimizer", "parameterType": "categorical",
     "feasibleSpace": {"list": OPTIMIZERS}},
]  # fmt: skip


def key(lr: float, wd: float, width: int, opt: str) -> str:
    return f"{lr:g}|{wd:g}|{width}|{opt}"


def build_grid(path: Path) -> dict[str, list[float]]:
    """Train every grid configuration for real; {key: per-epoch val accuracy}."""
    import torch

    from kubetrain.core.distributed import DistContext
    from kubetrain.data import build_dataset, load_dataset
    from kubetrain.train.loop import fit

    torch.set_num_threads(1)
    base = load_config(overrides=["train.nproc=1", f"train.epochs={EPOCHS}", "tune.enabled=false"])
    ds = Path(tempfile.mkdtemp(prefix="kubetrain-search-bench-"))
    build_dataset(base.data, ds)
    data = load_dataset(ds)
    curves: dict[str, list[float]] = {}
    started = time.perf_counter()
    for lr, wd, width, opt in itertools.product(LRS, WDS, WIDTHS, OPTIMIZERS):
        cfg = base.with_params(
            {"train.lr": lr, "train.weight_decay": wd, "model.hidden_sizes": [width, 64],
             "train.optimizer": opt}
        )  # fmt: skip
        result = fit(cfg, open_task(cfg, data), DistContext())
        curves[key(lr, wd, width, opt)] = [s.val_accuracy for s in result.history]
    print(f"trained {len(curves)} configurations in {time.perf_counter() - started:.0f} s")
    path.write_text(json.dumps({"epochs": EPOCHS, "curves": curves}, indent=1))
    return curves


def snap(params: dict) -> str:
    lr = min(LRS, key=lambda v: abs(math.log(v) - math.log(params["train.lr"])))
    return key(lr, params["train.weight_decay"], params["model.hidden_sizes.0"],
               params["train.optimizer"])  # fmt: skip


def tune_cfg(algorithm: str, seed: int, early: str = "none"):
    space = json.dumps(SPACE)
    overrides = [f"tune.algorithm={algorithm}", f"tune.seed={seed}", f"tune.parameters={space}",
                 f"tune.trial_epochs={EPOCHS}", "tune.parallel_trials=1"]  # fmt: skip
    if algorithm == "grid":  # Katib's grid needs a step; walk exactly the trained values
        grid = dict(SPACE[0], parameterType="categorical", feasibleSpace={"list": LRS})
        overrides[2] = "tune.parameters=" + json.dumps([grid, *SPACE[1:]])
    if early == "medianstop":
        overrides += ["tune.early_stopping.algorithm=medianstop",
                      "tune.early_stopping.min_trials_required=3",
                      "tune.early_stopping.start_step=1"]  # fmt: skip
    if algorithm == "hyperband":
        overrides += ["tune.algorithm_settings={eta: 3}"]
    return load_config(overrides=overrides).tune


def run(curves, algorithm: str, seed: int, budget: int, early: str = "none"):
    """One search against the cache; returns [(best_so_far, epochs_spent_so_far)] per trial."""
    from kubetrain.tune.space import search_space

    tune = tune_cfg(algorithm, seed, early)
    pruner = make_pruner(tune) if early != "none" or algorithm == "hyperband" else None
    study = optuna.create_study(
        study_name=STUDY_NAME,  # as the tune step: hyperband's brackets hash the study name
        direction="maximize",
        sampler=make_sampler(tune),
        pruner=pruner or optuna.pruners.NopPruner(),
    )
    dists = search_space(tune)
    best, spent, trace = -1.0, 0, []
    for _ in range(budget):
        trial = study.ask(dists)
        curve = curves[snap(trial.params)]
        pruned = False
        for epoch, value in enumerate(curve, start=1):
            spent += 1
            trial.report(value, epoch)
            if epoch < len(curve) and trial.should_prune():
                pruned = True
                break
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            # GridSampler calls study.stop() when the grid is used up, outside optimize().
            with contextlib.suppress(RuntimeError):
                study.tell(trial, curve[-1])
            best = max(best, curve[-1])
        trace.append((best, spent))
    return trace


def trials_to_reach(trace, target: float) -> int | None:
    return next((i + 1 for i, (best, _) in enumerate(trace) if best >= target), None)


def fmt(values) -> str:
    found = [v for v in values if v is not None]
    missed = len(values) - len(found)
    if not found:
        return f"not reached ({missed} seeds)"
    text = f"{statistics.median(found):.1f} ({min(found)}-{max(found)})"
    return text + (f", not reached in {missed} seed(s)" if missed else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--budget", type=int, default=54, help="trials per search (30%% of grid)")
    ap.add_argument("--retrain", action="store_true", help="re-train the grid cache")
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # QMCSampler (sobol)
    RESULTS.mkdir(exist_ok=True)
    cache = RESULTS / "search_grid.json"
    if args.retrain or not cache.is_file():
        curves = build_grid(cache)
    else:
        curves = json.loads(cache.read_text())["curves"]
    size = len(curves)
    grid_best = max(c[-1] for c in curves.values())
    target = grid_best - 0.005
    print(f"grid: {size} configurations x {EPOCHS} epochs; best final val accuracy "
          f"{grid_best:.4f}; target >= {target:.4f} "
          f"({sum(c[-1] >= target for c in curves.values())} configurations reach it)")  # fmt: skip
    out = {"grid_size": size, "grid_best": grid_best, "target": target, "samplers": {}}
    print(
        f"\ntrials to come within 0.5 point of the grid's best (budget {args.budget} = "
        f"{args.budget / size:.0%} of the grid; median (min-max) over {args.seeds} seeds):"
    )
    for algo in SAMPLERS:
        needed = [
            trials_to_reach(run(curves, algo, s, size if algo == "grid" else args.budget), target)
            for s in range(args.seeds)
        ]
        out["samplers"][algo] = needed
        print(f"  {algo:22s} {fmt(needed)}")
    print(f"\nearly stopping (random sampler, {args.budget} trials, same proposals on/off):")
    out["early_stopping"] = {}
    for early, algo in (("medianstop", "random"), ("hyperband", "hyperband")):
        rows = []
        for s in range(args.seeds):
            off = run(curves, "random", s, args.budget)[-1]
            on = run(curves, algo, s, args.budget, early if early == "medianstop" else "none")[-1]
            rows.append({"best_off": off[0], "epochs_off": off[1], "best_on": on[0],
                         "epochs_on": on[1]})  # fmt: skip
        saved = [1 - r["epochs_on"] / r["epochs_off"] for r in rows]
        equal = sum(abs(r["best_on"] - r["best_off"]) < 1e-9 for r in rows)
        out["early_stopping"][early] = rows
        print(f"  {early:11s} trial-epochs saved {statistics.median(saved):.0%} "
              f"({min(saved):.0%}-{max(saved):.0%}); same best accuracy in {equal}/{len(rows)} "
              f"seeds; worst best-accuracy loss "
              f"{max(r['best_off'] - r['best_on'] for r in rows):.4f}")  # fmt: skip
    (RESULTS / "search.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
