"""One search trial as a DDP job: ``torchrun ... -m kubetrain.tune.trial_worker``.

Rank 0 reports each epoch's objective to the study and asks the pruner; the decision is summed
over ranks so every rank stops at the same epoch (a rank that stopped alone would hang the
others in their next all-reduce). Rank 0 writes the trial's result as JSON.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kubetrain.core.io import make_temp_dir, read_json, write_json
from kubetrain.tune.config import SearchConfig
from kubetrain.tune.study import pruning_callback


def launch(
    cfg: SearchConfig, dataset_dir: str, journal: str, trial_id: int, work_dir: Path
) -> dict[str, Any]:
    """Run the trial ``cfg`` (already the trial's config) as torchrun workers; return its result.

    Never raises for a failed trial: the result says ``failed`` with the workers' last lines.
    """
    from kubetrain.launch.local import free_port, threads_per_local_process

    tc = cfg.train
    work_dir.mkdir(parents=True, exist_ok=True)
    config_file = write_json(work_dir / "config.json", cfg.model_dump(mode="json"))
    result_file = work_dir / "result.json"
    result_file.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_local_process(cfg, tc.world_size)))
    log_dir = make_temp_dir("torchrun")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=1", f"--nproc-per-node={tc.nproc}", "--master-addr=127.0.0.1",
        f"--master-port={free_port()}", "--max-restarts=0", "--monitor-interval=0.2",
        f"--log-dir={log_dir}",  # torchrun never removes its log directory: ours, removed below
        "-m", "kubetrain.tune.trial_worker",
        "--dataset", dataset_dir, "--config-json", str(config_file), "--journal", journal,
        "--trial-id", str(trial_id), "--result", str(result_file),
    ]  # fmt: skip
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    if proc.returncode == 0 and result_file.is_file():
        return read_json(result_file)
    tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
    return {
        "state": "failed",
        "value": None,
        "curve": [],
        "epochs": 0,
        "error": f"torchrun exited with {proc.returncode}: " + " | ".join(tail),
        "seconds": time.perf_counter() - started,
        "world_size": tc.world_size,
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubetrain.tune.trial_worker")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--config-json", required=True, type=Path)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--trial-id", required=True, type=int)
    parser.add_argument("--result", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """One rank of a multi-process trial: train, report each epoch, rank 0 writes the result."""
    args = _parse_args(argv)

    import optuna
    import torch

    from kubetrain.core.distributed import init_from_env, shutdown
    from kubetrain.data import load_dataset
    from kubetrain.tasks import open_task
    from kubetrain.train.loop import Stopped, fit

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format=f"[trial rank {rank}] %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    cfg = SearchConfig.from_json(args.config_json.read_text())
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ctx = init_from_env()
    curve: list[float] = []
    on_epoch = pruning_callback(cfg, args.journal, args.trial_id, ctx, curve)
    state = "complete"
    try:
        fit(cfg, open_task(cfg, load_dataset(args.dataset)), ctx, on_epoch=on_epoch)
    except Stopped:
        state = "pruned"
    if ctx.is_main:
        result = {
            "state": state, "value": curve[-1] if curve else None, "curve": curve,
            "epochs": len(curve), "error": None, "seconds": time.perf_counter() - started,
            "world_size": ctx.world_size,
        }  # fmt: skip
        write_json(args.result, result)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
