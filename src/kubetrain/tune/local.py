"""Local search engine: Optuna, trials as separate processes, the study kept in a journal file.

The parent process asks the sampler for parameters and tells it the results; worker processes
train one trial each and report per-epoch objectives through the shared journal storage, so the
``medianstop`` and ``hyperband`` pruners see them as Katib's early stopping would. A trial with
more than one process (``tune.trial_nproc`` or a searched ``train.nproc``) runs as torchrun
workers (``kubetrain.tune.trial_worker``).

An interrupted search resumes from the journal: finished trials are kept, trials that were
running are marked ``interrupted`` (failed, but not counted against any budget) and re-asked.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetrain.core.errors import ConfigError, KubetrainError
from kubetrain.core.records import SearchSummary, Trial
from kubetrain.tasks import kind_of
from kubetrain.tune.config import SearchConfig, TuneConfig, objective_name
from kubetrain.tune.study import JOURNAL, STUDY_NAME, storage

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"  # user attribute of a trial cut off by an interrupted search


def trial_config(cfg: SearchConfig, params: dict[str, Any]) -> SearchConfig:
    """The config one trial trains with: shorter, on one node with ``tune.trial_nproc``
    processes, and the trial's params applied last (a searched ``train.nproc`` wins)."""
    tune = cfg.tune
    fixed = {"train.epochs": tune.epochs_per_trial, "train.nproc": tune.trial_nproc}
    return cfg.with_params({**fixed, "train.nnodes": 1, **params})


_DATASETS: dict[str, Any] = {}


def _init_worker(threads: int) -> None:
    import optuna
    import torch

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("kubetrain.train").setLevel(logging.WARNING)  # the parent logs per trial


def run_trial(
    cfg_json: str, dataset_dir: str, journal: str, trial_id: int, params: dict[str, Any]
) -> dict[str, Any]:
    """Train one trial (in a worker process); never raises: failures come back as data."""
    from kubetrain.core.distributed import DistContext
    from kubetrain.data import load_dataset
    from kubetrain.tasks import open_task
    from kubetrain.train.loop import Stopped, fit
    from kubetrain.tune.study import pruning_callback

    started = time.perf_counter()
    curve: list[float] = []
    try:
        cfg = trial_config(SearchConfig.from_json(cfg_json), params)
        if cfg.train.world_size > 1:
            from kubetrain.tune.trial_worker import launch

            work = Path(journal).parent / "trials" / str(trial_id)
            return launch(cfg, dataset_dir, journal, trial_id, work)
        if dataset_dir not in _DATASETS:
            _DATASETS[dataset_dir] = load_dataset(dataset_dir)
        on_epoch = pruning_callback(cfg, journal, trial_id, DistContext(), curve)
        fit(cfg, open_task(cfg, _DATASETS[dataset_dir]), DistContext(), on_epoch=on_epoch)
        value: float | None = curve[-1]  # the objective of the last epoch
        state = "complete"
    except Stopped:
        value, state, error = (curve[-1] if curve else None), "pruned", None
    except Exception as err:  # a failed trial is recorded, not fatal
        value, state = None, "failed"
        error = f"{type(err).__name__}: {err}"
        log.debug("trial failed:\n%s", traceback.format_exc())
    else:
        error = None
    return {
        "state": state,
        "value": value,
        "curve": curve,
        "epochs": len(curve),
        "error": error,
        "seconds": time.perf_counter() - started,
        "world_size": 1,
    }


@dataclass
class _Progress:
    """Where a search stands: trials finished (failed ones count, as in Katib), failures, and
    this run's records by trial number."""

    budget: int
    done: int = 0
    failures: int = 0
    best: float | None = None
    records: dict[int, dict[str, Any]] = field(default_factory=dict)


def run_search(cfg: SearchConfig, dataset_dir: Path, out_dir: Path) -> SearchSummary:
    """Run the search; write best_params.json and trials.json to ``out_dir``.

    Args:
        cfg: the pipeline config; ``cfg.tune`` is the search, ``cfg.train`` each trial's base.
        dataset_dir: the dataset artifact the trials train on.
        out_dir: the search artifact directory (its journal makes a re-run resume).

    Returns:
        The search result (best parameters and value, trial counts, parameter importance).

    Raises:
        KubetrainError: more trials failed than ``tune.max_failed_trials``, or none completed.
    """
    import optuna

    from kubetrain.tune.space import make_pruner, make_sampler

    out_dir.mkdir(parents=True, exist_ok=True)
    journal = out_dir / JOURNAL
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage(journal),
        sampler=make_sampler(cfg.tune),
        pruner=make_pruner(cfg.tune),
        direction=cfg.tune.goal,
        load_if_exists=True,
    )
    progress = _resume(study, _budget(cfg.tune))
    started = time.perf_counter()
    results_imports = _import_in_background(RESULTS_IMPORTS)
    _run_trials(study, cfg, dataset_dir, journal, progress)
    _check_failures(study, cfg.tune, progress.failures)
    results_imports.join()
    seconds = time.perf_counter() - started
    return _write_results(study, progress.records, cfg, out_dir, seconds)


def _budget(tune: TuneConfig) -> int:
    """How many trials the search runs in all: ``max_trials``, or fewer if the grid is smaller."""
    from kubetrain.tune.space import grid_size

    if tune.algorithm == "grid":
        return min(tune.max_trials, grid_size(tune))
    return tune.max_trials


def _resume(study: optuna.Study, budget: int) -> _Progress:
    """Mark trials an interrupted search left running (re-run, not counted) and count the
    finished ones against the budget."""
    from optuna.trial import TrialState

    for stale in (t for t in study.trials if t.state == TrialState.RUNNING):
        study._storage.set_trial_user_attr(stale._trial_id, INTERRUPTED, True)
        study.tell(stale.number, state=TrialState.FAIL)
    finished = [
        t for t in study.trials if t.state.is_finished() and not t.user_attrs.get(INTERRUPTED)
    ]
    progress = _Progress(budget=budget, done=len(finished))
    progress.failures = sum(t.state == TrialState.FAIL for t in finished)
    complete = [t.value for t in finished if t.state == TrialState.COMPLETE and t.value is not None]
    if complete:
        progress.best = max(complete) if study.direction.name == "MAXIMIZE" else min(complete)
    if finished:
        log.info("resuming search: %d trial(s) already finished", len(finished))
    return progress


def _trials_at_once(tune: TuneConfig, budget: int) -> int:
    """How many trials run at once: ``tune.parallel_trials``, within the budget and the CPU
    cores (each trial runs ``tune.trial_nproc`` processes; past one per core they only take
    turns while each holds the model and the data).

    Raises:
        ConfigError: one trial alone needs more processes than there are cores.
    """
    from kubetrain.launch.local import cpu_cores

    cores, per_trial = cpu_cores(), tune.trial_nproc
    if per_trial > cores:
        raise ConfigError(
            f"config error: tune.trial_nproc: {per_trial} processes per trial, but this machine "
            f"has {cores} CPU core(s) (set it to {cores} or less)"
        )
    wanted = max(1, min(tune.parallel_trials, budget))
    fit = max(1, cores // per_trial)
    if wanted > fit:
        log.warning(
            "tune.parallel_trials=%d x tune.trial_nproc=%d processes exceed the %d CPU core(s): "
            "running %d trial(s) at a time",
            tune.parallel_trials, per_trial, cores, fit,
        )  # fmt: skip
        return fit
    return wanted


def _run_trials(
    study: optuna.Study, cfg: SearchConfig, dataset_dir: Path, journal: Path, progress: _Progress
) -> None:
    """Ask, run and tell trials, ``tune.parallel_trials`` at a time, in fresh worker processes,
    until the budget is spent or too many have failed."""
    from kubetrain.tune.space import search_space

    tune = cfg.tune
    dists = search_space(tune)
    workers = _trials_at_once(tune, progress.budget)
    threads = max(1, (os.cpu_count() or 1) // workers)
    log.info("%d trial(s), %d at a time", progress.budget - progress.done, workers)
    cfg_json = cfg.narrowed(SearchConfig).model_dump_json()
    ctx = _trial_processes()
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        running: dict[Future, optuna.trial.Trial] = {}
        while True:
            while (
                len(running) < workers
                and progress.done + len(running) < progress.budget
                and progress.failures <= tune.max_failed_trials
            ):
                trial = study.ask(dists)
                args = (cfg_json, str(dataset_dir), str(journal), trial._trial_id, trial.params)
                running[pool.submit(run_trial, *args)] = trial
            if not running:
                return
            completed, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in completed:
                trial = running.pop(fut)
                try:
                    rec = fut.result()
                except BrokenProcessPool:
                    # A trial process was killed (the OOM killer, a signal): the pool is gone
                    # with every trial in it. Say so in one line; the finished trials stay in
                    # the journal, so a re-run resumes the search.
                    raise KubetrainError(
                        f"tune: a trial process died (trial {trial.number}, params "
                        f"{trial.params}); out of memory? lower train.batch_size or "
                        "tune.parallel_trials, then re-run to resume the search"
                    ) from None
                _finish(study, trial, rec, tune, progress)


# What every trial imports. The trial processes fork from one fresh server process that has
# imported these (and run nothing): each trial process starts with them loaded instead of
# importing torch itself, and no trial inherits this process's threads or state.
TRIAL_IMPORTS = ["kubetrain.tune.local", "kubetrain.data", "kubetrain.train.loop", "torch._dynamo"]


def _trial_processes() -> multiprocessing.context.BaseContext:
    """The multiprocessing context the trials run in: forkserver with TRIAL_IMPORTS preloaded
    where the platform has it, else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(TRIAL_IMPORTS)
    return ctx


def _finish(
    study: optuna.Study,
    trial: optuna.trial.Trial,
    rec: dict[str, Any],
    tune: TuneConfig,
    progress: _Progress,
) -> None:
    """Tell the study a trial's result, count it and log one line (the live view reads it)."""
    _tell(study, trial, rec)
    progress.records[trial.number] = {"number": trial.number, "params": trial.params, **rec}
    progress.done += 1
    if rec["state"] == "failed":
        progress.failures += 1
        log.warning("trial %d/%d failed: %s", progress.done, progress.budget, rec["error"])
        return
    value = rec["value"]
    if rec["state"] == "complete" and value is not None:
        better = max if tune.goal == "maximize" else min
        progress.best = value if progress.best is None else better(progress.best, value)
    best = "nan" if progress.best is None else f"{progress.best:.4f}"
    log.info(
        "trial %d/%d %s %s=%.4f best=%s after %d epoch(s) %s",
        progress.done, progress.budget, rec["state"], tune.objective_metric,
        float("nan") if value is None else value, best, rec["epochs"], trial.params,
    )  # fmt: skip


def _check_failures(study: optuna.Study, tune: TuneConfig, failures: int) -> None:
    """Raise if more trials failed than ``tune.max_failed_trials`` allows."""
    if failures <= tune.max_failed_trials:
        return
    errors = [t.user_attrs.get("error") for t in study.trials if t.user_attrs.get("error")]
    raise KubetrainError(
        f"tuning failed: {failures} trials failed (tune.max_failed_trials = "
        f"{tune.max_failed_trials}); first error: {errors[0] if errors else 'unknown'}"
    )


# What _write_results imports (fANOVA: scikit-learn's forests; the report: matplotlib), imported
# while the trials run rather than after them.
RESULTS_IMPORTS = ("optuna.importance", "kubetrain.evaluate.report")


def _import_in_background(modules: tuple[str, ...]) -> threading.Thread:
    def run() -> None:
        for module in modules:
            with contextlib.suppress(Exception):  # the import where it is used reports it
                importlib.import_module(module)

    thread = threading.Thread(target=run, name="kubetrain-imports", daemon=True)
    thread.start()
    return thread


def _tell(study: optuna.Study, trial: optuna.trial.Trial, rec: dict[str, Any]) -> None:
    from optuna.trial import TrialState as states

    # Kept in the study, so a resumed search still reports them.
    for key in ("error", "seconds", "world_size"):
        if rec.get(key) is not None:
            trial.set_user_attr(key, rec[key])
    try:
        if rec["state"] == "complete":
            study.tell(trial, rec["value"])
        elif rec["state"] == "pruned":
            study.tell(trial, state=states.PRUNED)
        else:
            study.tell(trial, state=states.FAIL)
    except RuntimeError as err:
        # GridSampler calls study.stop() once the grid is used up, which Optuna only allows
        # inside optimize(); the result is stored before that, and our budget stops the loop.
        if "Study.stop" not in str(err):
            raise


def _trials(study: optuna.Study, records: dict[int, dict[str, Any]]) -> tuple[list[Trial], int]:
    """The study's trials as records (this run's measurements where it has them), and how many
    an interrupted run left unfinished (those are not counted)."""
    trials, interrupted = [], 0
    for t in study.trials:
        if t.user_attrs.get(INTERRUPTED):
            interrupted += 1
            continue
        rec = records.get(t.number, {})
        trials.append(
            Trial(
                number=t.number,
                state=t.state.name.lower(),
                value=t.value,
                params=t.params,
                curve=rec.get("curve") or [v for _, v in sorted(t.intermediate_values.items())],
                seconds=rec.get("seconds", t.user_attrs.get("seconds")),
                error=rec.get("error", t.user_attrs.get("error")),
                world_size=rec.get("world_size", t.user_attrs.get("world_size")),
            )
        )
    return trials, interrupted


def _write_results(
    study: optuna.Study, records: dict[int, dict[str, Any]], cfg: SearchConfig, out_dir: Path,
    seconds: float,
) -> SearchSummary:  # fmt: skip
    trials, interrupted = _trials(study, records)
    complete = [t for t in trials if t.state == "complete"]
    if not complete:
        raise KubetrainError("tuning failed: no trial completed")
    best = study.best_trial
    result = SearchSummary(
        enabled=True,
        engine="optuna",
        algorithm=cfg.tune.algorithm,
        metric=cfg.tune.objective_metric,
        objective=objective_name(cfg.tune, kind_of(cfg.data)),
        goal=cfg.tune.goal,
        best_params=best.params,
        best_value=best.value,
        best_trial=best.number,
        trials_total=len(trials),
        trials_complete=len(complete),
        trials_pruned=sum(t.state == "pruned" for t in trials),
        trials_failed=sum(t.state == "fail" for t in trials),
        trials_interrupted=interrupted,
        trial_epochs_total=sum(len(t.curve) for t in trials),
        param_importance=param_importance(study, cfg.tune.seed),
        search_seconds=seconds,
    )
    from kubetrain.core.artifacts import SearchResult
    from kubetrain.evaluate.report import render_search

    # Trials and report first, the summary last: it marks a complete search artifact.
    SearchResult(result, trials).save(out_dir, render_search(result, trials))
    return result


def param_importance(study: optuna.Study, seed: int = 0) -> dict[str, float]:
    """fANOVA importance of each searched parameter over the completed trials ({} if too few)."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    try:
        found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed))
    except (RuntimeError, ValueError) as err:  # e.g. every trial had the same values
        log.info("no parameter importance: %s", err)
        return {}
    return {name: float(value) for name, value in found.items()}
