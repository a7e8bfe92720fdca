"""Real torchrun worker processes (gloo on CPU) against a single process."""

from __future__ import annotations

import pytest
import torch

from kubetrain.config import load_config
from kubetrain.io import read_json
from kubetrain.launch.local import LocalLauncher

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
    from kubetrain.errors import KubetrainError

    # 2 processes x batch 4096 > samples: every rank raises a ConfigError and exits non-zero.
    cfg = load_config(overrides=[*BASE, "train.nproc=2", "train.batch_size=4096"])
    with pytest.raises(KubetrainError, match="training failed: torchrun exited"):
        LocalLauncher().run(cfg, digits_dir, tmp_path / "m")
    assert not (tmp_path / "m" / "model.json").exists()
