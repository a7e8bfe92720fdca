"""The cluster-job lifecycle (``kubetrain.launch.cluster``) against a fake Kubernetes API: the
cases a real API server cannot produce on demand (a deadline that passes inside a call that
cannot connect; a dataset copy that fails half-way). The lifecycle against a real API server:
tests/cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetrain.core.errors import KubetrainError
from kubetrain.launch import cluster
from kubetrain.launch.cluster import ClusterJob, run_job
from kubetrain.launch.kubeapi import KubeApiError, Resource
from kubetrain.pipeline.config import load_config

HOST = "https://127.0.0.1:6443"
JOBS = Resource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")


class Clock:
    """``time.monotonic`` and ``time.sleep`` of the lifecycle: time moves only when told."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeKubeApiThatCannotConnect:
    """The Kubernetes API boundary, faked: every read fails as an unreachable server does,
    after ``takes`` seconds (a connect attempt that times out)."""

    host = HOST
    namespace = "team-a"

    def __init__(self, clock: Clock, takes: float):
        self.clock = clock
        self.takes = takes
        self.creates = 0

    def check_namespace(self) -> None:
        pass

    def create(self, res: Resource, body: dict) -> dict:
        self.creates += 1
        return body

    def read(self, res: Resource, name: str):
        self.clock.now += self.takes
        raise KubeApiError(f"cannot reach the Kubernetes API at {HOST} to read x", status=0)

    def watch(self, *args):  # never reached: every read fails
        raise AssertionError("watch without a read")


class QuietWatcher:
    resource = JOBS
    success = "Succeeded"

    def suspended(self, obj) -> bool:
        return False

    def observe(self, api, obj) -> None:
        pass

    def explain(self, what: str, reason: str) -> str:
        return f"{what} failed: {reason}"

    def close(self) -> None:
        pass


def cfg_for(claim: Path, *settings: str):
    return load_config(
        None,
        [
            "cluster.backend=kubernetes", "cluster.namespace=team-a",
            "cluster.image=registry.example/kubetrain:test", f"cluster.mount_path={claim}",
            "cluster.poll_seconds=1", "tune.enabled=false", *settings,
        ],
    )  # fmt: skip


@pytest.mark.parametrize(
    "takes",
    [0.0, 2.5, 9.0],
    ids=["deadline-passes-while-sleeping", "deadline-passes-in-the-call", "call-outlasts-it"],
)
def test_a_deadline_during_an_outage_is_one_message_wherever_it_passes_fake_api(
    takes, tmp_path, monkeypatch
):
    clock = Clock()
    monkeypatch.setattr(cluster.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(cluster.time, "sleep", clock.sleep)
    cfg = cfg_for(tmp_path, "cluster.wait_timeout_seconds=8")
    job = ClusterJob(cfg, FakeKubeApiThatCannotConnect(clock, takes), QuietWatcher())
    with pytest.raises(KubetrainError) as err:
        job.wait("kubetrain-train-x")
    assert str(err.value).startswith(
        "pytorchjob team-a/kubetrain-train-x did not finish within "
        f"cluster.wait_timeout_seconds = 8 (the API server at {HOST} has not answered for "
    ), str(err.value)


def test_an_outage_longer_than_outage_seconds_ends_the_wait_before_its_deadline_fake_api(
    tmp_path, monkeypatch
):
    clock = Clock()
    monkeypatch.setattr(cluster.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(cluster.time, "sleep", clock.sleep)
    cfg = cfg_for(tmp_path, "cluster.wait_timeout_seconds=3600")
    job = ClusterJob(cfg, FakeKubeApiThatCannotConnect(clock, 5.0), QuietWatcher())
    with pytest.raises(KubeApiError, match=r"no usable answer for \d+ s while waiting for "
                       r"pytorchjob team-a/kubetrain-train-x\)$"):  # fmt: skip
        job.wait("kubetrain-train-x")
    assert clock.now - 1000.0 < 3600


def test_a_dataset_copy_that_fails_leaves_nothing_on_the_claim_fake_api(tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "meta.json").write_text("{}")
    # copytree copies the rest, then fails on the dangling link: a copy that fails half-way.
    (dataset / "shard-1.bin").symlink_to(tmp_path / "gone")
    claim = tmp_path / "claim"
    claim.mkdir()
    api = FakeKubeApiThatCannotConnect(Clock(), 0.0)
    body = {"metadata": {"name": "kubetrain-train-copy1"}}
    with pytest.raises(KubetrainError, match=r"cannot copy the dataset .* on the claim") as err:
        run_job(cfg_for(claim), api, QuietWatcher(), body, dataset, lambda *a: None)
    assert "\n" not in str(err.value)
    assert api.creates == 0
    assert list((claim / "jobs").iterdir()) == []


def test_a_job_directory_that_exists_on_the_claim_is_left_alone_fake_api(tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    claim = tmp_path / "claim"
    theirs = claim / "jobs" / "kubetrain-train-taken1" / "model"
    theirs.mkdir(parents=True)
    api = FakeKubeApiThatCannotConnect(Clock(), 0.0)
    body = {"metadata": {"name": "kubetrain-train-taken1"}}
    with pytest.raises(KubetrainError, match=r"already exists on the claim"):
        run_job(cfg_for(claim), api, QuietWatcher(), body, dataset, lambda *a: None)
    assert theirs.is_dir() and api.creates == 0
