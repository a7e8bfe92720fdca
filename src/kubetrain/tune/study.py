"""The local search's Optuna study: its name and its journal file, shared by the search
(``kubetrain.tune.local``) and a trial's torchrun workers (``kubetrain.tune.trial_worker``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

STUDY_NAME = "kubetrain"
JOURNAL = "study.journal"


def storage(path: Path) -> optuna.storages.JournalStorage:
    """The study's journal file at ``path`` (appends only; safe for several processes)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
