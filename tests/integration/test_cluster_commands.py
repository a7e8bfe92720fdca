"""The commands the cluster manifests carry, run for real on this machine.

A PyTorchJob's, TrainJob's or Katib trial's container command is executed the way the kubelet
would (its ``$(VAR)`` references expanded from the container's env plus the variables the
operator, or the TrainJob's torch runtime, adds);
no API server is involved (the launcher running a job's own command against a real API server:
tests/cluster/test_train_launcher.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kubetrain.core.io import read_json
from kubetrain.data import build_dataset
from kubetrain.launch.local import free_port
from kubetrain.pipeline.config import load_config
from kubetrain.tune.katib import METRICS_FILTER, build_experiment, parse_metrics

SMALL = [
    "cluster.image=registry.example/kubetrain:test",
    "model.hidden_sizes=[32]",
    "train.nproc=1",
    "train.batch_size=64",
]


def injected(api: str) -> dict[str, str]:
    """What the controller adds to the pod of a one-node job: the Training Operator's variables
    for a PyTorchJob's Master, the torch runtime's PET_* for a TrainJob's node 0."""
    port = str(free_port())
    if api == "trainjob":
        return {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "0",
                "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port}  # fmt: skip
    return {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}


def kubelet_run(
    container: dict, replace: dict[str, str], timeout: int = 180, api: str = "pytorchjob"
):
    """Run ``container``'s command here as a pod would (python = this interpreter)."""
    env = {e["name"]: e["value"] for e in container["env"]}
    operator = injected(api)
    env.update(operator)
    cmd = []
    for arg in container["command"]:
        for old, new in replace.items():
            arg = arg.replace(old, new)
        cmd.append(re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg))
    assert cmd[0] == "python"
    cmd[0] = sys.executable
    base = {k: v for k, v in os.environ.items() if k not in operator}
    return subprocess.run(
        cmd, env={**base, **env}, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dataset")
    build_dataset(load_config(None, []).data, out)
    return out


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_katib_trial_command_runs_the_worker_and_the_collector_parses_its_output(
    dataset, tmp_path, api
):
    cfg = load_config(None, [*SMALL, "tune.trial_epochs=2", f"cluster.training_api={api}"])
    spec = build_experiment(cfg, "kubetrain-tune-0a1b2c")["spec"]
    job = spec["trialTemplate"]["trialSpec"]["spec"]
    if api == "trainjob":
        container = job["trainer"]
    else:
        container = job["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    dataset_arg = container["command"][container["command"].index("--dataset") + 1]
    out = tmp_path / "trial"
    # Katib substitutes the trial's parameters into the template.
    done = kubelet_run(
        container,
        {
            "${trialParameters.train-lr}": "0.004",
            "${trialParameters.train-weight_decay}": "0.001",
            dataset_arg: str(dataset),
            "/tmp/kubetrain-trial": str(out),
        },
        api=api,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = [
        spec["objective"]["objectiveMetricName"],
        *spec["objective"]["additionalMetricNames"],
    ]
    found = parse_metrics(done.stdout + done.stderr, metrics)
    history = read_json(out / "history.json")
    assert [v for n, v in found if n == "val_accuracy"] == [
        round(h["val_accuracy"], 6) for h in history
    ]
    assert [v for n, v in found if n == "val_loss"] == [round(h["val_loss"], 6) for h in history]
    assert len(history) == 2  # tune.trial_epochs, not train.epochs
    model = read_json(out / "model.json")
    assert model["train"]["lr"] == 0.004 and model["train"]["weight_decay"] == 0.001
    assert spec["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"] == [METRICS_FILTER]
    # Katib reads the leading RFC 3339 timestamp of a metrics line as the observation's time.
    line = next(ln for ln in done.stdout.splitlines() if "val_accuracy=" in ln)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z epoch=1 ", line)
