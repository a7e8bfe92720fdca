"""Every step in its image: build the runtime image, then run the whole pipeline under
``kfp.local.DockerRunner`` so each task runs in a container of it (read-only root, non-root
user), and check the outcomes the local run promises.

Needs a Docker engine (``.ci/run`` installs and starts one). Elsewhere the test skips itself,
except under CI, where a missing engine is a failure rather than a silent skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from kubetrain.core.io import read_json
from kubetrain.launch.image import runtime_image
from kubetrain.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("run-params", "preprocess", "tune", "train", "quantize", "evaluate", "check-accuracy")
METRIC_KEYS = {
    "test_accuracy_fp32", "test_accuracy_int8", "quantize_method", "model_size_bytes_fp32",
    "model_size_bytes_int8", "train_samples_per_second",
}  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _docker_or_skip() -> None:
    try:
        import docker

        client = docker.from_env()
        client.ping()
        client.close()
    except Exception as err:  # no package, no socket, no daemon: all mean "no engine here"
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide a Docker engine (.ci/run starts dockerd): {err}")
        pytest.skip(f"no Docker engine reachable ({type(err).__name__}): run scripts/dockerd.sh")


@pytest.fixture(scope="module")
def runtime_image_built() -> str:
    _docker_or_skip()
    started = time.perf_counter()
    subprocess.run([str(ROOT / "images" / "build.sh"), "runtime"], cwd=ROOT, check=True)
    print(f"images/build.sh runtime: {time.perf_counter() - started:.0f} s")
    return runtime_image()


def _container_starts(out: str) -> int:
    """DockerRunner prints ``Found image '<image>'`` once per task it starts in a container."""
    return out.count(f"Found image '{runtime_image()}'")


def _executed(captured) -> list[str]:
    """The tasks kfp.local executed (not taken from its cache), from its log lines."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", captured.out + captured.err)
    return re.findall(r"Executing task '([\w-]+)'", text)


def test_pipeline_runs_every_step_in_the_image(runtime_image_built, tmp_path, capfd):
    from kubetrain.pipeline.run import run_local

    result = run_local(load_config(), tmp_path / "run", runner="docker", verbose=True)
    captured = capfd.readouterr()
    print(f"pipeline in containers: {result.seconds:.0f} s")

    executed = _executed(captured)
    assert sorted(executed) == sorted([*TASKS, "promote"])
    assert _container_starts(captured.out) == len(executed)  # each one in a container
    m = result.metrics
    assert set(m) >= METRIC_KEYS, METRIC_KEYS - set(m)
    assert read_json(result.run_dir / "metrics.json") == m
    assert m["test_accuracy_fp32"] >= 0.9 and m["test_accuracy_int8"] >= 0.9
    assert m["model_size_bytes_int8"] < m["model_size_bytes_fp32"]
    assert result.report.stat().st_size > 10_000
    assert "<html" in result.report.read_text().lower()
    assert m["promoted"] is True
    assert result.promoted_model is not None and any(result.promoted_model.iterdir())
    if os.getuid() == 0:
        # Written inside the container by the image's non-root user, not by this process.
        assert result.promoted_model.stat().st_uid == 10001

    # The other branch of the gate: an unreachable bar rejects the model. (Steps the cache
    # holds are not re-run; evaluate, which takes the bar, and the gate always are.)
    strict = load_config(overrides=["evaluate.min_accuracy=1.0"])
    rejected = run_local(strict, tmp_path / "run", runner="docker", verbose=True)
    captured = capfd.readouterr()
    assert rejected.metrics["promoted"] is False and rejected.promoted_model is None
    executed = _executed(captured)
    assert {"evaluate", "check-accuracy", "reject"} <= set(executed)
    assert "promote" not in executed
    assert _container_starts(captured.out) == len(executed)
    decisions = list((tmp_path / "run" / "kfp").glob("*/reject/decision/decision.json"))
    assert decisions and "below the bar" in read_json(decisions[-1])["reason"]


def test_missing_image_is_one_clear_error(monkeypatch, tmp_path):
    _docker_or_skip()
    from kubetrain.core.errors import KubetrainError
    from kubetrain.pipeline.run import docker_runner

    monkeypatch.setenv("KUBETRAIN_IMAGE", "kubetrain-no-such-image:0")
    with pytest.raises(KubetrainError, match=r"not in the local Docker engine.*make images"):
        docker_runner(tmp_path / "kfp")


OCI_LABELS = ("title", "description", "version", "revision", "created", "source", "licenses")


def test_image_holds_nothing_of_the_build_host(runtime_image_built):
    """Non-root (a numeric user runAsNonRoot can verify), unbuffered, labelled; CPU torch and
    kfp import (the components need kfp); no pip setting, secret or wheel mount left behind."""
    import docker

    from kubetrain import __version__

    client = docker.from_env()
    try:
        config = client.images.get(runtime_image_built).attrs["Config"]
        assert config["User"] == "10001:10001"
        assert "PYTHONUNBUFFERED=1" in config["Env"]
        assert not [e for e in config["Env"] if e.startswith("PIP_")]
        labels = config["Labels"]
        assert labels["org.opencontainers.image.version"] == __version__
        assert all(labels.get(f"org.opencontainers.image.{name}") for name in OCI_LABELS)
        script = (
            "python -c 'import torch, kfp; print(torch.version.cuda)';"
            " pip config list; ls /run/secrets /wheels /build 2>/dev/null; echo end"
        )
        out = client.containers.run(runtime_image_built, ["sh", "-c", script], remove=True)
    finally:
        client.close()
    assert out.decode().split() == ["None", "end"]


def test_trainer_image_has_cuda_torch_and_trains_unprivileged():
    """The CUDA trainer image, where one was built (``make image-trainer``; on a host with no
    registry ``IMAGE_BASE=local make image-trainer``): it is never built here, as it takes
    minutes and ~6 GB. Its torch must be a CUDA build (never the host's local ``+cpu`` wheel),
    and it trains as its non-root user on a read-only root. (No GPU needed: training runs on CPU.)
    """
    _docker_or_skip()
    import docker
    from docker.errors import ImageNotFound

    from kubetrain import __version__

    image = f"ghcr.io/kubetrain/kubetrain-trainer:{__version__}"
    client = docker.from_env()
    try:
        try:
            config = client.images.get(image).attrs["Config"]
        except ImageNotFound:
            pytest.skip(f"{image} is not built: IMAGE_BASE=local make image-trainer builds it")
        assert config["User"] == "10001:10001"
        assert not [e for e in config["Env"] if e.startswith("PIP_")]
        script = (
            "python -c 'import torch; print(torch.__version__, torch.version.cuda)'"
            " && ls /run/secrets /wheels /build 2>/dev/null; cd /tmp"
            " && kubetrain preprocess --output ds && kubetrain train --dataset ds --output model"
            " --set train.epochs=1 --set train.nproc=1 && ls model"
        )
        out = client.containers.run(
            image, ["sh", "-c", script], remove=True, read_only=True,
            tmpfs={"/tmp": "rw,exec"}, environment={"OMP_NUM_THREADS": "1"},
        ).decode()  # fmt: skip
    finally:
        client.close()
    version, cuda = out.splitlines()[0].split()
    assert version.startswith("2.13.") and "+cpu" not in version and cuda != "None", out
    assert "model.pt" in out.split(), out
