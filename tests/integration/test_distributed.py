"""Real torchrun worker processes (gloo on CPU) against a single process."""

from __future__ import annotations

import pytest
import torch

from kubetrain.core.io import read_json
from kubetrain.launch.local import LocalLauncher
from kubetrain.pipeline.config import load_config

BASE = ["train.epochs=3", "train.batch_size=64", "train.seed=7", "tune.enabled=false"]


def _train(tmp_path, digits_dir, name, *overrides):
    cfg = load_config(overrides=[*BASE, *overrides])
    out = tmp_path / name
    LocalLauncher().run(cfg, digits_dir, out)
    return torch.load(out / "model.pt", weights_only=True), read_json(out / "metrics.json")


def _max_diff(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory, digits_dir):
    return _train(tmp_path_factory.mktemp("single"), digits_dir, "m", "train.nproc=1")


@pytest.mark.parametrize(
    "layout",
    [
        ["train.nproc=2"],
        ["train.nproc=2", "train.grad_accum_steps=2"],
        ["train.nnodes=2", "train.nproc=1"],
    ],
    ids=["2-processes", "2-processes-accum", "2-nodes"],
)
def test_distributed_run_matches_one_process(tmp_path, digits_dir, single, layout):
    weights, metrics = _train(tmp_path, digits_dir, "m", *layout)
    assert metrics["world_size"] == 2
    assert metrics["ranks_identical"] is True  # every rank ended with the same bits
    assert _max_diff(weights, single[0]) < 1e-5
    assert metrics["steps"] == single[1]["steps"]


def test_a_failing_worker_fails_the_step_with_a_clear_message(tmp_path, digits_dir):
    from kubetrain.core.errors import KubetrainError

    # 2 processes x batch 4096 > samples: every rank raises a ConfigError and exits non-zero.
    cfg = load_config(overrides=[*BASE, "train.nproc=2", "train.batch_size=4096"])
    with pytest.raises(KubetrainError, match="training failed: torchrun exited"):
        LocalLauncher().run(cfg, digits_dir, tmp_path / "m")
    assert not (tmp_path / "m" / "model.json").exists()


def test_gradient_accumulation_skips_the_allreduce_on_micro_steps(tmp_path, digits_dir):
    _, metrics = _train(tmp_path, digits_dir, "m", "train.nproc=2", "train.grad_accum_steps=2")
    assert metrics["allreduce_calls"] == metrics["steps"]  # one bucket, once per step, not twice


@pytest.mark.slow
def test_killed_worker_restarts_from_the_last_checkpoint(tmp_path, digits_dir):
    """SIGKILL one real worker mid-training: torchrun restarts the group, which resumes."""
    import signal
    import threading
    import time

    import psutil

    slow = ["train.nproc=2", "train.epochs=12", "model.hidden_sizes=[1024, 1024]",
            "train.checkpoint_every_steps=20"]  # fmt: skip
    reference, _ = _train(tmp_path, digits_dir, "reference", *slow)
    out = tmp_path / "killed"
    cfg = load_config(
        overrides=[*BASE, *slow, "train.max_restarts=3", "train.collective_timeout_seconds=60"]
    )
    errors: list[BaseException] = []

    def train() -> None:
        try:
            LocalLauncher().run(cfg, digits_dir, out)
        except BaseException as err:  # surfaced below
            errors.append(err)

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob("ckpt-*.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    victims = [
        p for p in psutil.process_iter(["cmdline", "environ"])
        if "kubetrain.launch.worker" in (p.info["cmdline"] or [])
        and str(out) in (p.info["cmdline"] or [])
        and (p.info["environ"] or {}).get("LOCAL_RANK") == "1"
    ]  # fmt: skip
    assert len(victims) == 1, "no running worker to kill (training ended too soon?)"
    os_kill_step = max(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("ckpt-*.json"))
    victims[0].send_signal(signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive(), "the restarted job did not finish"
    assert not errors, errors
    metrics = read_json(out / "metrics.json")
    # One kill, one restart. (With torchrun's store shared across rounds, the restarted workers
    # could read the dead worker's address and fail or hang again: see NO_SHARED_STORE.)
    assert metrics["restarts"] == 1
    assert metrics["resumed_from_step"] >= os_kill_step  # lost at most one interval
    weights = torch.load(out / "model.pt", weights_only=True)
    assert _max_diff(weights, reference) == 0.0  # and ended exactly where it would have
