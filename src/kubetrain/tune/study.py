"""The local search's Optuna study: its name and its journal file, shared by the search
(``kubetrain.tune.local``) and a trial's torchrun workers (``kubetrain.tune.trial_worker``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

    from kubetrain.core.distributed import DistContext
    from kubetrain.core.records import EpochStats
    from kubetrain.tune.config import SearchConfig

STUDY_NAME = "kubetrain"
JOURNAL = "study.journal"


def storage(path: Path) -> optuna.storages.JournalStorage:
    """The study's journal file at ``path`` (appends only; safe for several processes)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def pruning_callback(
    cfg: SearchConfig, journal: str, trial_id: int, ctx: DistContext, curve: list[float]
) -> Callable[[EpochStats], bool]:
    """A trial's epoch callback: rank 0 reports the objective (appended to ``curve``) to the
    study and asks whether to prune; every rank learns the answer (a collective in a
    multi-process trial), so all stop at the same epoch. Stopping after the last epoch saves
    nothing: such a trial counts as complete."""
    import optuna

    from kubetrain.core.distributed import all_reduce_sum
    from kubetrain.tune.space import make_pruner

    trial = None
    if ctx.is_main:
        study = optuna.load_study(
            study_name=STUDY_NAME, storage=storage(Path(journal)), pruner=make_pruner(cfg.tune)
        )
        # The pruner is not kept in the storage: every process's study needs it given again.
        trial = optuna.trial.Trial(study, trial_id)
    metric = cfg.tune.objective_metric

    def on_epoch(stats: EpochStats) -> bool:
        value = getattr(stats, metric)
        curve.append(value)
        stop = 0.0
        if trial is not None:
            trial.report(value, stats.epoch)
            stop = float(stats.epoch < cfg.train.epochs and trial.should_prune())
        return all_reduce_sum([stop], ctx)[0] > 0

    return on_epoch
