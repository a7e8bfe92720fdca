"""Local launcher: in this process for one worker, torchrun processes for more."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from kubetrain.core.artifacts import MODEL_SPEC
from kubetrain.core.errors import ConfigError, KubetrainError
from kubetrain.core.io import make_temp_dir, write_json
from kubetrain.core.processes import parent_death_signal, stop_once
from kubetrain.launch.config import JobConfig
from kubetrain.launch.torchrun import NO_SHARED_STORE, torchrun_command
from kubetrain.train.config import TrainConfig, TrainingConfig

log = logging.getLogger(__name__)


def threads_per_local_process(cfg: JobConfig, processes: int) -> int:
    """Torch/OpenMP threads of each of ``processes`` on this machine: ``train.num_threads``, or
    this machine's CPU cores less one shared out over ``processes`` (≥ 1).

    One core is left for everything else (the KFP task, data workers, the OS): on a small CPU a
    process with more threads than free cores stalls whenever another process takes a core
    (measured here: 2 threads on 2 busy cores run 10-70x slower than 1).
    """
    if cfg.train.num_threads:
        return cfg.train.num_threads
    return max(1, ((os.cpu_count() or 1) - 1) // processes)


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's cpuset counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_processes(cfg: JobConfig) -> None:
    """Refuse a local job with more worker processes than this machine has CPU cores.

    Every worker needs a core of its own: beyond that they only take turns (one torch thread
    per process is already the fastest here) while each holds a full copy of the model and the
    data (``train.nproc=64`` on 2 cores once started 64 workers and used 19 GB). Refused rather
    than capped: a cap would silently run another job than the config describes.

    Raises:
        ConfigError: ``train.nproc`` x ``train.nnodes`` exceeds the CPU cores (exit 2).
    """
    tc, cores = cfg.train, cpu_cores()
    if tc.world_size > cores:
        nodes = f" x {tc.nnodes} nodes" if tc.nnodes > 1 else ""
        raise ConfigError(
            f"config error: train.nproc: {tc.nproc} processes{nodes} = {tc.world_size} workers, "
            f"but this machine has {cores} CPU core(s); a local run uses at most one worker per "
            f"core (set train.nproc to {max(1, cores // tc.nnodes)} or less)"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalLauncher:
    """Runs training on this machine; ``train.nnodes`` agents emulate nodes over 127.0.0.1."""

    def run(self, cfg: JobConfig, dataset_dir: Path, out_dir: Path) -> None:
        check_processes(cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.train.world_size == 1:
            self._run_in_process(cfg, dataset_dir, out_dir)
        else:
            self._run_torchrun(cfg, dataset_dir, out_dir)

    def _run_in_process(self, cfg: JobConfig, dataset_dir: Path, out_dir: Path) -> None:
        import torch

        from kubetrain.core.distributed import DistContext
        from kubetrain.data import load_dataset
        from kubetrain.tasks import open_task
        from kubetrain.train.checkpoint import checkpoint_dir
        from kubetrain.train.loop import fit, save_model

        torch.set_num_threads(threads_per_local_process(cfg, 1))
        task = open_task(cfg, load_dataset(dataset_dir))
        result = fit(cfg, task, DistContext(), checkpoint_dir=checkpoint_dir(cfg, out_dir))
        save_model(result, cfg, task, out_dir)

    def _run_torchrun(self, cfg: JobConfig, dataset_dir: Path, out_dir: Path) -> None:
        tc = cfg.train
        training = cfg.narrowed(TrainingConfig)  # what the workers read
        config_file = write_json(out_dir / ".train-config.json", training.model_dump(mode="json"))
        port = free_port()
        env = _agent_env(cfg)
        # torchrun makes a log directory per run and never removes it; ours goes with the job
        # (and, if this process is killed, with the next start: kubetrain.core.io).
        log_dir = make_temp_dir("torchrun")
        agents: list[subprocess.Popen] = []
        # In a KFP task process nothing handles SIGTERM: a signal to the process group (GNU
        # timeout, a container stop) would end it at once and leave the agents training. Here
        # it unwinds as Ctrl-C does, into _stop; a second signal does not interrupt that.
        stopping = stop_once((signal.SIGTERM, signal.SIGINT), _interrupt, only_unhandled=True)
        try:
            stopping.__enter__()
            cmd = _agent_command(tc, port, log_dir, dataset_dir, config_file, out_dir)
            for _ in range(tc.nnodes):
                agents.append(_start_agent(cmd, env))
            log.info("launched %d torchrun agent(s) x %d processes", tc.nnodes, tc.nproc)
            codes = [agent.wait() for agent in agents]
        except BaseException:
            _stop(agents)  # interrupted (Ctrl-C, SIGTERM): the workers go with this process
            raise
        finally:
            stopping.__exit__(None, None, None)
            OWN_STOP.difference_update(agent.pid for agent in agents)
            config_file.unlink(missing_ok=True)
            shutil.rmtree(log_dir, ignore_errors=True)
        _check_trained(codes, out_dir)


def _agent_env(cfg: JobConfig) -> dict[str, str]:
    """The agents' environment: this one, with threads shared out over the workers."""
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads_per_local_process(cfg, cfg.train.world_size))
    )
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pairs on loopback too (one machine)
    env.setdefault(NO_SHARED_STORE, "1")
    return env


def _agent_command(
    tc: TrainConfig, port: int, log_dir: Path, dataset_dir: Path, config_file: Path, out_dir: Path
) -> list[str]:
    """One node's torchrun command: every agent meets the others on 127.0.0.1:``port``, and its
    workers train on ``dataset_dir`` with ``config_file`` into ``out_dir``."""
    return torchrun_command(
        tc.nproc,
        [
            f"--nnodes={tc.nnodes}",
            # c10d rendezvous (not a static master address): after a failure the
            # restarted group meets again through the agents' store. Everything on
            # loopback: the host name may resolve to an address this sandbox cannot
            # connect to.
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id=kubetrain-{port}", "--local-addr=127.0.0.1",
        ],
        ["--dataset", str(dataset_dir), "--config-json", str(config_file),
         "--output", str(out_dir)],
        max_restarts=tc.max_restarts,
        python=sys.executable,
        options=["--monitor-interval=0.2", f"--log-dir={log_dir}"],
    )  # fmt: skip


def _start_agent(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start one torchrun agent and add it to ``OWN_STOP``."""
    # In a process group of its own: a signal to ours (Ctrl-C, GNU timeout) reaches
    # this launcher, which stops the agent and its workers quietly (signalled
    # directly, torchrun prints a traceback per process). It gets SIGTERM if this
    # process dies without stopping it (SIGKILL).
    agent = subprocess.Popen(cmd, env=env, start_new_session=True,
                             preexec_fn=parent_death_signal())  # fmt: skip
    OWN_STOP.add(agent.pid)
    return agent


def _check_trained(codes: list[int], out_dir: Path) -> None:
    """A KubetrainError unless every agent exited 0 and a model was written."""
    if any(codes):
        raise KubetrainError(
            f"training failed: torchrun exited with {codes} (the workers' log lines above say why)"
        )
    if not (out_dir / MODEL_SPEC).is_file():
        raise KubetrainError(f"training failed: no model was written to {out_dir}")


# torchrun agents this process runs. They are stopped by ``_stop``, never by a forwarded SIGINT
# (kubetrain.cli): a signalled torchrun prints a traceback per process it runs.
OWN_STOP: set[int] = set()


def _interrupt(signum: int) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(agents: list[subprocess.Popen], grace: float = 30.0) -> None:
    """Stop torchrun agents and their workers quietly: freeze each agent (so it does not report
    its workers' deaths as failures), end the workers with SIGTERM, then kill the agent."""
    import psutil

    for agent in agents:
        if agent.poll() is not None:
            continue
        try:
            parent = psutil.Process(agent.pid)
            parent.suspend()
            workers = parent.children(recursive=True)
        except psutil.Error:
            workers = []
        for worker in workers:
            with contextlib.suppress(psutil.Error):
                worker.terminate()
        deadline = time.monotonic() + grace
        # Ended workers stay zombies until the (frozen) agent is gone: those count as ended.
        while (alive := [w for w in workers if _running(w)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        for worker in alive:
            with contextlib.suppress(psutil.Error):
                worker.kill()
        agent.kill()
        agent.wait()


def _running(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
