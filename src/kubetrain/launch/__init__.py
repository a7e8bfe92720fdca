"""Launchers: where a training job runs. One interface; the maths is the same everywhere.

``local``: the current process (1 process) or torchrun worker processes on this machine.
``kubernetes``: a Kubeflow Training Operator PyTorchJob (``kubetrain.launch.kubernetes``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # kubetrain.config imports kubetrain.launch.config, which runs this file
    from kubetrain.config import PipelineConfig

# torchrun's c10d rendezvous shares one TCPStore with the workers across restarts, and in torch
# 2.13 it keeps that store (and its keys) from one round to the next: after a restart a worker can
# read the previous round's gloo/NCCL addresses and connect to a dead process ("Connection
# refused", seen here when a killed worker restarted; pytorch/pytorch#135712, #167288). With
# sharing off, rank 0 of each round hosts a fresh store.
NO_SHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


class TrainLauncher(Protocol):
    def run(self, cfg: PipelineConfig, dataset_dir: Path, out_dir: Path) -> None:
        """Train ``cfg`` on the dataset artifact and write the model artifact to ``out_dir``."""


def get_launcher(cfg: PipelineConfig) -> TrainLauncher:
    """The launcher of ``cluster.backend``."""
    match cfg.cluster.backend:
        case "kubernetes":
            from kubetrain.launch.kubernetes import KubernetesLauncher

            return KubernetesLauncher()
        case _:
            from kubetrain.launch.local import LocalLauncher

            return LocalLauncher()
