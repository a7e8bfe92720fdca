"""Training as a Kubeflow Trainer v2 TrainJob against a real API server (the Trainer v2.3.0 and
JobSet CRDs: the server refuses a field their schemas do not have), as the pipeline's
ServiceAccount, the test playing the Trainer controller (conditions, JobSet-labelled pods) and
Kueue (a job suspended at creation, admitted later or never); ``auto`` choosing the API by what
the server serves.
"""

from __future__ import annotations

import logging
import time

import pytest

from cluster.controllers import (
    IMAGE,
    cluster_cfg,
    condition_v2,
    in_background,
    kueue_admits_after,
    play_success,
    play_trainjob,
    run_the_master,
)
from kubetrain.core.errors import ConfigError, KubetrainError
from kubetrain.core.io import read_json
from kubetrain.pipeline import steps

pytestmark = pytest.mark.cluster


def test_the_train_step_returns_the_model_its_trainjob_trained(
    runner, operator, digits_dir, tmp_path, caplog
):
    cfg = cluster_cfg(runner.namespace, tmp_path / "claim", api="trainjob")
    join = in_background(lambda: play_trainjob(operator, train=run_the_master))
    with caplog.at_level(logging.WARNING):
        metrics = steps.train(cfg, digits_dir, tmp_path / "model")
    join()
    assert metrics.world_size == 1 and metrics.epochs == 1
    # the run records which API trained it
    assert metrics.training_api == "trainjob"
    assert metrics.cluster_job.startswith(f"trainjob {runner.namespace}/kubetrain-train-")
    assert read_json(tmp_path / "model" / "metrics.json")["training_api"] == "trainjob"
    assert operator.objects("trainjobs") == []  # cluster.cleanup on_success
    assert list((tmp_path / "claim" / "jobs").iterdir()) == []
    # the log of node 0 (found by JobSet's labels) is followed; no kubelet here serves it
    (warning,) = [r.getMessage() for r in caplog.records if "log of pod" in r.getMessage()]
    assert "-node-0-0-" in warning and "HTTP 204" in warning


FAILURES = {
    "oomkilled": (
        {"state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}},
        ("FailedJobs", "jobset failed due to reaching max restarts"),
        r"failed: FailedJobs: .*container node was OOMKilled; raise cluster.memory, now 2Gi\)$",
    ),
    "deadline": (
        {"state": {"running": {}}},
        ("DeadlineExceeded", "TrainJob exceeded its active deadline"),
        r"failed: DeadlineExceeded: TrainJob exceeded its active deadline "
        r"\(cluster.active_deadline_seconds = 60\)$",
    ),
    "imagepullbackoff": (
        {"state": {"waiting": {"reason": "ImagePullBackOff",
                               "message": f'Back-off pulling image "{IMAGE}"'}}},
        None,
        r"cannot start: pod \S+-node-0-0-\w+: ImagePullBackOff: Back-off pulling image",
    ),
}  # fmt: skip


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failed_trainjob_is_one_line_as_for_pytorchjob(
    runner, operator, tiny_dataset, tmp_path, failure
):
    container_status, failed, message = FAILURES[failure]
    cfg = cluster_cfg(
        runner.namespace, tmp_path / "claim", "cluster.active_deadline_seconds=60", api="trainjob"
    )

    def play():
        name = operator.created("trainjobs")["metadata"]["name"]
        phase = "Pending" if "waiting" in container_status["state"] else "Running"
        if failed and failed[0] == "FailedJobs":
            phase = "Failed"
        operator.node_pod(name, phase, container_status)
        if failed:
            operator.conditions("trainjobs", name, [condition_v2("Failed", *failed)])

    join = in_background(play)
    with pytest.raises(KubetrainError, match=message) as err:
        steps.train(cfg, tiny_dataset, tmp_path / "model")
    join()
    assert "\n" not in str(err.value)
    assert f"trainjob {runner.namespace}/kubetrain-train-" in str(err.value)
    # a failed job is kept to inspect (cleanup on_success); one that never started is not
    assert len(operator.objects("trainjobs")) == (0 if failed is None else 1)
    assert not (tmp_path / "model").exists()


def test_a_job_kueue_holds_is_waiting_in_its_queue_until_admitted(
    runner, operator, tiny_dataset, tmp_path, caplog
):
    cfg = cluster_cfg(
        runner.namespace, tmp_path / "claim", "cluster.queue_name=gpu-queue",
        "cluster.priority_class=high", api="trainjob",
    )  # fmt: skip
    seen = {}

    def play():
        def queue(name):
            kueue_admits_after(operator, 3)(name)

        job = play_trainjob(operator, queue=queue)
        seen["labels"] = job["metadata"]["labels"]

    join = in_background(play)
    with caplog.at_level(logging.INFO, logger="kubetrain.launch.cluster"):
        steps.train(cfg, tiny_dataset, tmp_path / "model")
    join()
    assert seen["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert seen["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    lines = [r.getMessage() for r in caplog.records]
    waiting = [i for i, m in enumerate(lines) if m.endswith(": waiting in queue gpu-queue")]
    admitted = [i for i, m in enumerate(lines) if "admitted from queue gpu-queue after" in m]
    assert len(waiting) == 1 and len(admitted) == 1 and waiting[0] < admitted[0], lines


@pytest.mark.parametrize("api", ["trainjob", "pytorchjob"])
def test_a_job_never_admitted_ends_at_the_wait_timeout_in_one_line(
    runner, operator, tiny_dataset, tmp_path, api
):
    plural = f"{api}s"
    cfg = cluster_cfg(
        runner.namespace, tmp_path / "claim", "cluster.queue_name=gpu-queue",
        "cluster.wait_timeout_seconds=5", api=api,
    )  # fmt: skip

    def hold():
        name = operator.created(plural)["metadata"]["name"]
        operator.suspend(plural, name, True)

    join = in_background(hold)
    with pytest.raises(
        KubetrainError,
        match=rf"{api} \S+ did not finish within cluster.wait_timeout_seconds = 5 \(waiting in "
        r"queue gpu-queue for \d+ s: not admitted; is the queue's quota large enough",
    ) as err:
        steps.train(cfg, tiny_dataset, tmp_path / "model")
    join()
    assert "\n" not in str(err.value)
    assert operator.objects(plural) == []  # not finished: deleted (cleanup on_success)


def test_elastic_training_with_trainjob_is_one_line(runner, tmp_path, tiny_dataset):
    with pytest.raises(KubetrainError, match=r"cluster.elastic: TrainJob .* no elastic"):
        cluster_cfg(runner.namespace, tmp_path / "claim", "cluster.elastic=true", api="trainjob")


# -- auto: what the API server serves -------------------------------------------------------


@pytest.fixture
def without_crds(control_plane):
    """Remove CRDs for one test (the server stops serving them), and put them back."""
    from cluster.controlplane import CRDS, RUNTIMES

    removed: list[str] = []

    def remove(*names: str) -> None:
        for name in names:
            control_plane.kubectl("delete", "crd", name, "--wait=true")
            removed.append(name)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = control_plane.kubectl("api-resources", "-o", "name", check=False).stdout
            if not any(name in listed.split() for name in names):
                return
            time.sleep(0.5)
        raise AssertionError(f"{names} still served")

    yield remove
    if removed:
        control_plane.kubectl("apply", "--server-side", *[a for p in CRDS for a in ("-f", str(p))])
        control_plane.wait_established()
        if "clustertrainingruntimes.trainer.kubeflow.org" in removed:
            control_plane.kubectl(
                "apply", "--server-side", *[a for p in RUNTIMES for a in ("-f", str(p))]
            )


def test_auto_takes_trainjob_where_it_is_served(runner, operator, tiny_dataset, tmp_path, caplog):
    cfg = cluster_cfg(runner.namespace, tmp_path / "claim", api="auto")
    join = in_background(lambda: play_trainjob(operator))
    with caplog.at_level(logging.INFO, logger="kubetrain.launch.jobkinds"):
        metrics = steps.train(cfg, tiny_dataset, tmp_path / "model")
    join()
    assert metrics.training_api == "trainjob"
    assert any("serves trainjobs.trainer.kubeflow.org" in r.getMessage() for r in caplog.records)


def test_auto_takes_pytorchjob_where_trainjob_is_not_served(
    runner, operator, without_crds, tiny_dataset, tmp_path
):
    without_crds("trainjobs.trainer.kubeflow.org")
    cfg = cluster_cfg(runner.namespace, tmp_path / "claim", api="auto")
    join = in_background(lambda: play_success(operator))
    metrics = steps.train(cfg, tiny_dataset, tmp_path / "model")
    join()
    assert metrics.training_api == "pytorchjob"


def test_auto_with_neither_served_names_both_in_one_line(
    runner, without_crds, tiny_dataset, tmp_path
):
    without_crds("trainjobs.trainer.kubeflow.org", "pytorchjobs.kubeflow.org")
    cfg = cluster_cfg(runner.namespace, tmp_path / "claim", api="auto")
    with pytest.raises(KubetrainError) as err:
        steps.train(cfg, tiny_dataset, tmp_path / "model")
    message = str(err.value)
    assert "\n" not in message and not isinstance(err.value, ConfigError)
    assert "serves neither trainjobs.trainer.kubeflow.org (Kubeflow Trainer v2) nor " in message
    assert "pytorchjobs.kubeflow.org (Training Operator v1): install Kubeflow Trainer v2" in message
    assert list((tmp_path / "claim" / "jobs").glob("*")) == []
