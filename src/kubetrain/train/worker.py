"""Entry point of one training process: ``torchrun ... -m kubetrain.train.worker``.

The same module runs under local torchrun processes and inside PyTorchJob pods (whose
operator sets the torchrun variables), so one code path serves both.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from kubetrain.errors import KubetrainError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetrain.train.worker")
    parser.add_argument("--dataset", required=True, type=Path)
    parser.add_argument("--config-json", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)

    import torch

    from kubetrain.config import config_from_json
    from kubetrain.data import load_dataset
    from kubetrain.launch.local import checkpoint_dir
    from kubetrain.train.distributed import init_from_env, shutdown
    from kubetrain.train.loop import fit, save_model

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = config_from_json(args.config_json.read_text())
        threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or cfg.train.num_threads or 1
        torch.set_num_threads(threads)
        data = load_dataset(args.dataset)
        ctx = init_from_env()
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restarts and rank == 0:
            logging.getLogger(__name__).warning("worker group restart %d", restarts)
        result = fit(cfg, data, ctx, checkpoint_dir=checkpoint_dir(cfg, args.output))
        result.summary["restarts"] = restarts
        if ctx.is_main:
            save_model(result, cfg, data, args.output)
        shutdown()
    except KubetrainError as err:
        print(f"[rank {rank}] {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
