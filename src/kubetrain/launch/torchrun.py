"""The one torchrun command line: local agents, PyTorchJob pods and Katib trials start training
through ``torchrun_command()``; ``NO_SHARED_STORE`` is the variable every elastic launch sets.
"""

from __future__ import annotations

from collections.abc import Sequence

# torchrun's c10d rendezvous shares one TCPStore with the workers across restarts, and in torch
# 2.13 it keeps that store (and its keys) from one round to the next: after a restart a worker can
# read the previous round's gloo/NCCL addresses and connect to a dead process ("Connection
# refused", seen here when a killed worker restarted; pytorch/pytorch#135712, #167288). With
# sharing off, rank 0 of each round hosts a fresh store.
NO_SHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
WORKER_MODULE = "kubetrain.launch.worker"


def torchrun_command(
    nproc: int | str,
    rendezvous: Sequence[str],
    worker_args: Sequence[str],
    *,
    max_restarts: int = 0,
    python: str = "python",
    options: Sequence[str] = (),
) -> list[str]:
    """The one torchrun command line: ``nproc`` workers of ``kubetrain.launch.worker``.

    Local agents, PyTorchJob pods and Katib trials all start training through this.

    Args:
        nproc: ``--nproc-per-node`` (a number, or ``$(PET_NPROC_PER_NODE)`` in a TrainJob pod).
        rendezvous: how the nodes meet (``--nnodes``/``--rdzv-*`` locally, the operator's
            ``$(MASTER_ADDR)`` variables in a pod, nothing with an elasticPolicy).
        worker_args: the worker's own arguments (``--dataset ... --output ...``).
        max_restarts: torchrun's ``--max-restarts``.
        python: the interpreter (``sys.executable`` locally, ``python`` in the image).
        options: further torchrun options (e.g. ``--monitor-interval``).

    Returns:
        The argv list.
    """
    return [
        python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *rendezvous,
        f"--max-restarts={max_restarts}", *options, "-m", WORKER_MODULE, *worker_args,
    ]  # fmt: skip
