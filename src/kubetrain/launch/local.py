"""Local launcher: in this process for one worker, torchrun processes for more."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from kubetrain.config import PipelineConfig
from kubetrain.errors import KubetrainError
from kubetrain.io import write_json
from kubetrain.launch.torchrun import NO_SHARED_STORE, torchrun_command

log = logging.getLogger(__name__)


def threads_per_local_process(cfg: PipelineConfig, processes: int) -> int:
    """Torch/OpenMP threads of each of ``processes`` on this machine: ``train.num_threads``, or
    this machine's CPU cores less one shared out over ``processes`` (≥ 1).

    One core is left for everything else (the KFP task, data workers, the OS): on a small CPU a
    process with more threads than free cores stalls whenever another process takes a core
    (measured here: 2 threads on 2 busy cores run 10-70x slower than 1).
    """
    if cfg.train.num_threads:
        return cfg.train.num_threads
    return max(1, ((os.cpu_count() or 1) - 1) // processes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalLauncher:
    """Runs training on this machine; ``train.nnodes`` agents emulate nodes over 127.0.0.1."""

    def run(self, cfg: PipelineConfig, dataset_dir: Path, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.train.world_size == 1:
            self._run_in_process(cfg, dataset_dir, out_dir)
        else:
            self._run_torchrun(cfg, dataset_dir, out_dir)

    def _run_in_process(self, cfg: PipelineConfig, dataset_dir: Path, out_dir: Path) -> None:
        import torch

        from kubetrain.data import load_dataset
        from kubetrain.train.checkpoint import checkpoint_dir
        from kubetrain.train.distributed import DistContext
        from kubetrain.train.loop import fit, save_model

        torch.set_num_threads(threads_per_local_process(cfg, 1))
        data = load_dataset(dataset_dir)
        result = fit(cfg, data, DistContext(), checkpoint_dir=checkpoint_dir(cfg, out_dir))
        save_model(result, cfg, data, out_dir)

    def _run_torchrun(self, cfg: PipelineConfig, dataset_dir: Path, out_dir: Path) -> None:
        tc = cfg.train
        config_file = write_json(out_dir / ".train-config.json", cfg.model_dump(mode="json"))
        port = free_port()
        run_id = f"kubetrain-{port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_local_process(cfg, tc.world_size)))
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pairs on loopback too (one machine)
        env.setdefault(NO_SHARED_STORE, "1")
        agents = []
        for _ in range(tc.nnodes):
            cmd = torchrun_command(
                tc.nproc,
                [
                    f"--nnodes={tc.nnodes}",
                    # c10d rendezvous (not a static master address): after a failure the
                    # restarted group meets again through the agents' store. Everything on
                    # loopback: the host name may resolve to an address this sandbox cannot
                    # connect to.
                    "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                    f"--rdzv-id={run_id}", "--local-addr=127.0.0.1",
                ],
                ["--dataset", str(dataset_dir), "--config-json", str(config_file),
                 "--output", str(out_dir)],
                max_restarts=tc.max_restarts,
                python=sys.executable,
                options=["--monitor-interval=0.2"],
            )  # fmt: skip
            agents.append(subprocess.Popen(cmd, env=env))
        log.info("launched %d torchrun agent(s) x %d processes", tc.nnodes, tc.nproc)
        codes = [agent.wait() for agent in agents]
        config_file.unlink(missing_ok=True)
        if any(codes):
            raise KubetrainError(
                f"training failed: torchrun exited with {codes} (the workers' log lines above say why)"
            )
        if not (out_dir / "model.json").is_file():
            raise KubetrainError(f"training failed: no model was written to {out_dir}")
