"""Launchers: where a training job runs. One interface; the maths is the same everywhere.

``local``: the current process (1 process) or torchrun worker processes on this machine.
``kubernetes``: a Kubeflow Training Operator PyTorchJob (not part of this release yet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from kubetrain.config import PipelineConfig
from kubetrain.errors import KubetrainError


class TrainLauncher(Protocol):
    def run(self, cfg: PipelineConfig, dataset_dir: Path, out_dir: Path) -> None:
        """Train ``cfg`` on the dataset artifact and write the model artifact to ``out_dir``."""


def get_launcher(cfg: PipelineConfig) -> TrainLauncher:
    if cfg.cluster.backend == "local":
        from kubetrain.launch.local import LocalLauncher

        return LocalLauncher()
    raise KubetrainError(
        "cluster.backend 'kubernetes': the PyTorchJob launcher is not available in this version "
        "of kubetrain; use cluster.backend=local"
    )
