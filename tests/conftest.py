"""Shared fixtures: a digits dataset artifact built once, small configs, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetrain.core.artifacts import DatasetArtifact
from kubetrain.core.records import DatasetMeta
from kubetrain.pipeline.config import PipelineConfig, load_config
from kubetrain.tasks import open_task
from kubetrain.tasks.base import Task

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"
UNIT = Path(__file__).parent / "unit"
KUBETRAIN = [sys.executable, "-m", "kubetrain.cli"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test outside tests/unit ``integration``: the unit tier is tests/unit and
    nothing else, and a new suite elsewhere still runs in CI's integration step
    (docs/testing.md)."""
    for item in items:
        if not Path(item.path).is_relative_to(UNIT):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One torch thread per test process: on a small shared CPU, more threads stall."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The default dataset artifact (digits, seed 0), built once per session."""
    from kubetrain.data import build_dataset

    out = tmp_path_factory.mktemp("digits")
    build_dataset(load_config().data, out)
    return out


@pytest.fixture
def small_cfg() -> PipelineConfig:
    """A fast single-process config: 3 epochs, no tuning."""
    return load_config(
        overrides=["train.nproc=1", "train.epochs=3", "tune.enabled=false", "train.seed=1"]
    )


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``kubetrain ARGS`` in a fresh interpreter; returns the completed process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [*KUBETRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# Tests that need github.com (kustomize's remote bases of manifests/platform/) run only where a
# person says it is reachable: no test here probes hosts beyond loopback and the package indexes.
REMOTE_OPT_IN = "KUBETRAIN_REMOTE_TESTS"


def needs_github(what: str) -> None:
    """Skip unless ``KUBETRAIN_REMOTE_TESTS=1`` says github.com can be reached."""
    if os.environ.get(REMOTE_OPT_IN) != "1":
        pytest.skip(f"{what} needs github.com (set {REMOTE_OPT_IN}=1 where it is reachable)")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, digits_dir) -> Path:
    """An MLP trained on digits for 4 epochs in this process: what the quantize tests start from."""
    from kubetrain.core.distributed import DistContext
    from kubetrain.data import load_dataset
    from kubetrain.train.loop import fit, save_model

    cfg = load_config(overrides=["train.nproc=1", "train.epochs=4"])
    data = load_dataset(digits_dir)
    out = tmp_path_factory.mktemp("model")
    task = open_task(cfg, data)
    save_model(fit(cfg, task, DistContext()), cfg, task, out)
    return out


def quick_quantize_config(**kw):
    """A QuantizeConfig that measures little (5 latency repeats, 1 QAT epoch)."""
    from kubetrain.quantize.config import QuantizeConfig

    return QuantizeConfig(latency_repeats=5, qat_epochs=1, **kw)


def pytorchjob_roundtrip(manifest: dict) -> dict:
    """Through the official kubeflow-training models and back (unknown fields are dropped)."""
    import json

    from kubeflow.training.api_client import ApiClient

    class Response:
        data = json.dumps(manifest)

    client = ApiClient()
    return client.sanitize_for_serialization(
        client.deserialize(Response(), "KubeflowOrgV1PyTorchJob")
    )


def assert_one_train_error_and_no_model(stderr: str, model_dir: Path) -> None:
    """A failed training job said why once, from rank 0, with where it stopped, and wrote no
    model artifact."""
    import re

    errors = [line for line in stderr.splitlines() if "train error:" in line]
    assert len(errors) == 1 and errors[0].startswith("[rank 0] train error: ")
    assert re.search(r"at epoch \d+, step \d+", errors[0])
    assert not (model_dir / "model.json").exists()


class InMemoryTask(Task):
    """The quantize tests' tasks: splits held as tensors ``x``/``y`` by split, the model
    from the class's ``factory``. Quantize and evaluate never train, so training is not
    implemented."""

    factory: Any

    def __init__(self, root: Path, meta: dict, x: dict, y: dict) -> None:
        record = DatasetMeta(source="memory", config={}, **meta)
        super().__init__(load_config(), DatasetArtifact(root, record))
        self.x, self.y = x, y

    def build_model(self, model):
        return self.factory()

    def train_batches(self, tc, ctx):
        raise NotImplementedError

    def validate(self, model, ctx):
        raise NotImplementedError

    def examples(self, split: str, n: int, seed: int = 0):
        return self.x[split][:n], self.y[split][:n]
