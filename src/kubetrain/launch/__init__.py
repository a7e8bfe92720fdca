"""Launchers: where a training job runs. One interface; the maths is the same everywhere.

``local``: the current process (1 process) or torchrun worker processes on this machine.
``kubernetes``: a Kubeflow Trainer v2 TrainJob (``kubetrain.launch.trainjob``) or a Training
Operator v1 PyTorchJob (``kubetrain.launch.kubernetes``), as ``cluster.training_api`` picks
(``kubetrain.launch.jobkinds``), through
the one cluster lifecycle (``kubetrain.launch.cluster``) that Katib's search uses too. The tune
step's seam with the same shape is ``kubetrain.tune.backend``; the one torchrun command line all
of them start is ``kubetrain.launch.torchrun``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # kubetrain.pipeline.config imports kubetrain.launch.config, which runs this file
    from kubetrain.launch.config import JobConfig


class TrainLauncher(Protocol):
    def run(self, cfg: JobConfig, dataset_dir: Path, out_dir: Path) -> None:
        """Train ``cfg`` on the dataset artifact and write the model artifact to ``out_dir``."""


def get_launcher(cfg: JobConfig) -> TrainLauncher:
    """The launcher of ``cluster.backend``."""
    match cfg.cluster.backend:
        case "kubernetes":
            from kubetrain.launch.jobkinds import KubernetesLauncher

            return KubernetesLauncher()
        case _:
            from kubetrain.launch.local import LocalLauncher

            return LocalLauncher()
