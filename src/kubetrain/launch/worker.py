"""Entry point of one training process: ``torchrun ... -m kubetrain.launch.worker``.

The same module runs under local torchrun processes and inside PyTorchJob pods (whose
operator sets the torchrun variables), so one code path serves both.

Rank 0 prints one metrics line per epoch to stdout, the format Katib's StdOut metrics collector
parses (``kubetrain.tune.katib.METRICS_FILTER``)::

    2025-01-31T12:00:00.123456Z epoch=3 val_accuracy=0.9667 val_loss=0.1234 train_loss=0.2
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from kubetrain.core.errors import KubetrainError

# Metrics printed per epoch, in this order; the objective (val_accuracy or val_loss) is one.
METRIC_NAMES = ("val_accuracy", "val_loss", "train_loss")


def metrics_line(stats) -> str:
    """``<RFC 3339 time> epoch=N val_accuracy=... val_loss=... train_loss=...``.

    The leading timestamp is what Katib reads as the time of the observation.
    """
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    values = " ".join(f"{name}={getattr(stats, name):.6f}" for name in METRIC_NAMES)
    return f"{now} epoch={stats.epoch} {values}"


def _print_metrics(stats) -> bool:
    print(metrics_line(stats), flush=True)
    return False  # never stop training


def _load_config(args: argparse.Namespace):
    from kubetrain.core.config import parse_override
    from kubetrain.train.config import TrainingConfig

    if args.config_env:
        text = os.environ.get(args.config_env)
        if not text:
            raise KubetrainError(f"config error: environment variable {args.config_env} is empty")
    else:
        text = args.config_json.read_text()
    cfg = TrainingConfig.from_json(text)
    if args.overrides:
        cfg = cfg.with_params(dict(parse_override(item) for item in args.overrides))
    return cfg


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubetrain.launch.worker")
    parser.add_argument("--dataset", required=True, type=Path)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config-json", type=Path, help="file with the config as JSON")
    source.add_argument("--config-env", help="environment variable holding the config JSON")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config field (Katib substitutes trial parameters here)",
    )  # fmt: skip
    parser.add_argument("--output", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train as one rank of a torchrun job; rank 0 writes the model artifact to ``--output``.

    Returns the exit code: 0, or the ``KubetrainError``'s (its one line printed to stderr).
    """
    args = _parse_args(argv)
    from kubetrain.core.processes import die_with_parent

    # torchrun's agent stops its workers itself; if it is killed outright, they stop too.
    die_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    try:
        _train(args, rank)
    except KubetrainError as err:
        from kubetrain.train.trainer import NonFiniteLoss

        # Every rank stops with the same NonFiniteLoss at the same step: rank 0 says it once.
        if rank == 0 or not isinstance(err, NonFiniteLoss):
            print(f"[rank {rank}] {err}", file=sys.stderr)
        return err.exit_code
    return 0


def _train(args: argparse.Namespace, rank: int) -> None:
    """Load the config and the dataset, join the process group and train; the main rank
    prints the metrics lines and saves the model."""
    import torch

    from kubetrain.core.distributed import init_from_env, shutdown
    from kubetrain.data import load_dataset
    from kubetrain.tasks import open_task
    from kubetrain.train.checkpoint import checkpoint_dir
    from kubetrain.train.loop import fit, save_model

    _configure_logging(rank)
    cfg = _load_config(args)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or cfg.train.num_threads or 1
    torch.set_num_threads(threads)
    task = open_task(cfg, load_dataset(args.dataset))
    ctx = init_from_env(cfg.train.collective_timeout_seconds)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and rank == 0:
        logging.getLogger(__name__).warning("worker group restart %d", restarts)
    result = fit(
        cfg,
        task,
        ctx,
        on_epoch=_print_metrics if ctx.is_main else None,
        checkpoint_dir=checkpoint_dir(cfg, args.output),
    )
    result.summary.restarts = restarts
    if ctx.is_main:
        save_model(result, cfg, task, args.output)
    shutdown()


def _configure_logging(rank: int) -> None:
    """Log lines on stderr, prefixed with the rank; below warnings from rank 0 only."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(message)s",
        stream=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
