"""The train step on ``cluster.backend: kubernetes`` against a real API server, as the pipeline's
ServiceAccount (our own RBAC manifests), with the test playing the Training Operator and kubelet:
Created -> Running -> Succeeded through the status subresource, pods with the statuses a kubelet
writes, an API server killed mid-wait, a stale watch, taken names, bad credentials.
"""

from __future__ import annotations

import logging
import time

import pytest

from cluster.controllers import (
    IMAGE,
    cluster_cfg,
    in_background,
    play_success,
    run_the_master,
    tc_condition,
)
from kubetrain.core.errors import KubetrainError
from kubetrain.launch.cluster import ClusterJob, run_job
from kubetrain.launch.jobkinds import KubernetesLauncher
from kubetrain.launch.kubeapi import KubeApi, KubeApiError
from kubetrain.launch.kubernetes import PyTorchJobWatcher, build_pytorchjob
from kubetrain.pipeline import steps

pytestmark = pytest.mark.cluster


def test_the_train_step_returns_the_model_its_job_trained(
    runner, operator, digits_dir, tmp_path, caplog
):
    cfg = cluster_cfg(runner.namespace, tmp_path / "claim")
    join = in_background(lambda: play_success(operator, train=run_the_master))
    with caplog.at_level(logging.WARNING):
        metrics = steps.train(cfg, digits_dir, tmp_path / "model")
    join()
    assert metrics.world_size == 1 and metrics.epochs == 1
    assert (tmp_path / "model" / "model.json").is_file()
    assert operator.objects("pytorchjobs") == []  # cluster.cleanup on_success
    assert list((tmp_path / "claim" / "jobs").iterdir()) == []
    # no kubelet serves logs here: following the master's log degrades to one warning line
    (warning,) = [r.getMessage() for r in caplog.records if "log of pod" in r.getMessage()]
    assert "\n" not in warning and "-master-0" in warning and "HTTP 204" in warning


FAILURES = {
    "oomkilled": (
        {"state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}},
        r"failed: PyTorchJobFailed: .*container pytorch was OOMKilled; raise cluster.memory",
    ),
    "error": (
        {"state": {"terminated": {"reason": "Error", "exitCode": 1}}},
        r"failed: PyTorchJobFailed: .*container pytorch exited with code 1 \(Error\)",
    ),
    "imagepullbackoff": (
        {
            "state": {
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": f'Back-off pulling image "{IMAGE}"',
                }
            }
        },
        r"cannot start: pod \S+-master-0: ImagePullBackOff: Back-off pulling image",
    ),
}
# (failure, cluster.cleanup) -> is the job still there afterwards? A failed job is kept to
# inspect unless cleanup=always; one that never started is removed unless cleanup=never.
CASES = [
    ("oomkilled", "on_success", True),
    ("oomkilled", "always", False),
    ("error", "on_success", True),
    ("error", "never", True),
    ("imagepullbackoff", "on_success", False),
    ("imagepullbackoff", "never", True),
]


@pytest.mark.parametrize(
    ("failure", "cleanup", "kept"), CASES, ids=[f"{a}-{b}" for a, b, _ in CASES]
)
def test_a_failed_job_is_one_line_and_cleaned_up_per_cluster_cleanup(
    runner, operator, tiny_dataset, tmp_path, capsys, failure, cleanup, kept
):
    container_status, message = FAILURES[failure]
    cfg = cluster_cfg(runner.namespace, tmp_path / "claim", f"cluster.cleanup={cleanup}")

    def play():
        job = operator.created("pytorchjobs")
        name = job["metadata"]["name"]
        created = tc_condition("Created", "PyTorchJobCreated", f"PyTorchJob {name} is created.")
        operator.conditions("pytorchjobs", name, [created])
        phase = "Pending" if "waiting" in container_status["state"] else "Failed"
        operator.pod(f"{name}-master-0", name, phase, container_status)
        if phase == "Failed":  # the operator marks the job failed once its master failed
            failed = tc_condition(
                "Failed", "PyTorchJobFailed",
                f"PyTorchJob {name} is failed because 1 Master replica(s) failed.",
            )  # fmt: skip
            operator.conditions("pytorchjobs", name, [created, failed])

    join = in_background(play)
    with pytest.raises(KubetrainError, match=message) as err:
        steps.train(cfg, tiny_dataset, tmp_path / "model")
    join()
    assert "\n" not in str(err.value)
    assert f"pytorchjob {runner.namespace}/kubetrain-train-" in str(err.value)
    assert (len(operator.objects("pytorchjobs")) == 1) is kept
    assert any((tmp_path / "claim" / "jobs").iterdir()) is kept
    assert not (tmp_path / "model").exists()


def test_the_launcher_rides_out_an_api_server_restart_without_a_second_job(
    control_plane, runner, operator, tiny_dataset, tmp_path, caplog
):
    cfg = cluster_cfg(runner.namespace, tmp_path / "claim", "cluster.cleanup=never")
    join = in_background(lambda: play_success(operator, between=control_plane.restart_apiserver))
    with caplog.at_level(logging.WARNING):
        KubernetesLauncher().run(cfg, tiny_dataset, tmp_path / "model")
    join(300)
    assert (tmp_path / "model" / "model.json").is_file()
    assert len(operator.objects("pytorchjobs")) == 1
    creates = [
        e for e in control_plane.audit(runner.username)
        if e["verb"] == "create" and e["objectRef"]["resource"] == "pytorchjobs"
    ]  # fmt: skip
    assert len(creates) == 1
    assert any("waiting for it to come back" in r.getMessage() for r in caplog.records)


def test_an_api_server_that_stays_away_ends_the_wait_in_one_line(
    control_plane, runner, operator, tiny_dataset, tmp_path
):
    cfg = cluster_cfg(runner.namespace, tmp_path / "claim", "cluster.wait_timeout_seconds=8")

    def vanish():
        operator.created("pytorchjobs")
        control_plane.kill_apiserver()

    join = in_background(vanish)
    try:
        with pytest.raises(KubetrainError, match=r"pytorchjob \S+ did not finish within cluster."
                           r"wait_timeout_seconds = 8 \(the API server at https://127.0.0.1:\d+ "
                           r"has not answered for \d+ s\)$") as err:  # fmt: skip
            KubernetesLauncher().run(cfg, tiny_dataset, tmp_path / "model")
        join()
    finally:
        control_plane.start_apiserver()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "model").exists()


def test_a_watch_that_ends_or_expires_is_resumed_from_a_fresh_list(
    control_plane, runner, operator, tmp_path, caplog
):
    cfg = cluster_cfg(runner.namespace, tmp_path / "claim")
    job = build_pytorchjob(cfg, "kubetrain-train-watch1")
    api = KubeApi(runner.namespace)
    run = ClusterJob(cfg, api, PyTorchJobWatcher(cfg, emit=lambda _: None))
    run.submit(job)

    def play():
        time.sleep(3)  # longer than the 1 s watch windows: the server ends watches meanwhile
        play_success(operator)

    join = in_background(play)
    with caplog.at_level(logging.INFO):
        # resourceVersion 1 is long gone: the server answers 410 Gone, the wait lists again
        done = run.wait("kubetrain-train-watch1", since="1")
    join()
    assert done["metadata"]["name"] == "kubetrain-train-watch1"
    assert any("expired; listing it again" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
    watches = [
        e for e in control_plane.audit(runner.username)
        if e["verb"] == "watch" and e["objectRef"].get("resource") == "pytorchjobs"
    ]  # fmt: skip
    assert len(watches) >= 2


def test_a_name_that_is_taken_is_one_line_and_the_other_job_is_kept(
    runner, operator, tiny_dataset, tmp_path
):
    cfg = cluster_cfg(runner.namespace, tmp_path / "claim")
    theirs = build_pytorchjob(cfg, "kubetrain-train-taken")
    operator.custom.create_namespaced_custom_object(
        "kubeflow.org", "v1", runner.namespace, "pytorchjobs", theirs
    )
    api = KubeApi(runner.namespace)
    with pytest.raises(KubeApiError, match=r"cannot create pytorchjob \S+/kubetrain-train-taken: "
                       r"it already exists") as err:  # fmt: skip
        run_job(cfg, api, PyTorchJobWatcher(cfg), theirs, tiny_dataset, lambda *a: None)
    assert err.value.status == 409 and "\n" not in str(err.value)
    assert [o["metadata"]["name"] for o in operator.objects("pytorchjobs")] == [
        "kubetrain-train-taken"
    ]
    assert not any((tmp_path / "claim" / "jobs").iterdir())


def test_a_namespace_that_does_not_exist_is_one_line(
    control_plane, tiny_dataset, tmp_path, monkeypatch
):
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))  # admin: may read namespaces
    cfg = cluster_cfg("no-such-namespace", tmp_path / "claim")
    with pytest.raises(KubetrainError, match=r"namespace 'no-such-namespace' does not exist") as e:
        KubernetesLauncher().run(cfg, tiny_dataset, tmp_path / "model")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "claim" / "jobs").exists()


def test_a_revoked_or_invalid_token_is_one_line(
    control_plane, runner, operator, tiny_dataset, tmp_path, monkeypatch
):
    cfg = cluster_cfg(runner.namespace, tmp_path / "claim")
    # The account is deleted: its (bound) token is no longer valid anywhere.
    operator.core.delete_namespaced_service_account("kubetrain-pipeline-runner", runner.namespace)
    bogus = control_plane.kubeconfig_for("not-a-token", "bogus")
    for kubeconfig in (runner.kubeconfig, bogus):
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        with pytest.raises(KubeApiError, match=r"rejected the credentials") as err:
            KubernetesLauncher().run(cfg, tiny_dataset, tmp_path / "model")
        assert err.value.status == 401 and "\n" not in str(err.value)
    assert operator.objects("pytorchjobs") == []


@pytest.mark.parametrize("step", ["train", "tune"])
def test_the_cli_steps_say_a_missing_namespace_in_one_line(
    control_plane, step, tiny_dataset, tmp_path, capsys, monkeypatch
):
    from kubetrain.cli import main

    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    args = [step, "--dataset", str(tiny_dataset), "--output", str(tmp_path / "out")]
    for setting in ("cluster.backend=kubernetes", "cluster.namespace=not-here",
                    f"cluster.image={IMAGE}", f"cluster.mount_path={tmp_path}"):  # fmt: skip
        args += ["--set", setting]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "namespace 'not-here' does not exist on the cluster" in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "jobs").exists()
