"""The tune step's backend seam, beside the train one (``kubetrain.launch.get_launcher``).

Same verb as a ``TrainLauncher`` (``run(cfg, dataset_dir, out_dir)``), chosen by the same field
(``cluster.backend``): ``local`` searches with Optuna on this machine (``kubetrain.tune.local``),
``kubernetes`` creates a Katib Experiment through the shared cluster lifecycle
(``kubetrain.tune.katib``). Both write ``best_params.json`` and ``trials.json`` with the same
fields and return the search result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from kubetrain.core.records import SearchSummary
from kubetrain.tune.config import SearchConfig


class TuneBackend(Protocol):
    def run(self, cfg: SearchConfig, dataset_dir: Path, out_dir: Path) -> SearchSummary:
        """Search ``cfg.tune`` on the dataset artifact; write the tune artifact to ``out_dir``."""


class OptunaBackend:
    """``cluster.backend: local``: Optuna trials as processes on this machine."""

    def run(self, cfg: SearchConfig, dataset_dir: Path, out_dir: Path) -> SearchSummary:
        """See ``kubetrain.tune.local.run_search``."""
        from kubetrain.tune.local import run_search

        return run_search(cfg, dataset_dir, out_dir)


class KatibBackend:
    """``cluster.backend: kubernetes``: one Katib Experiment whose trials are TrainJobs or
    PyTorchJobs (``cluster.training_api``)."""

    def run(self, cfg: SearchConfig, dataset_dir: Path, out_dir: Path) -> SearchSummary:
        """See ``kubetrain.tune.katib.run_experiment``."""
        from kubetrain.tune.katib import run_experiment

        return run_experiment(cfg, dataset_dir, out_dir)


def get_tune_backend(cfg: SearchConfig) -> TuneBackend:
    """The tune backend of ``cluster.backend``.

    Args:
        cfg: the pipeline config.

    Returns:
        ``KatibBackend`` on ``kubernetes``, else ``OptunaBackend``.
    """
    match cfg.cluster.backend:
        case "kubernetes":
            return KatibBackend()
        case _:
            return OptunaBackend()
