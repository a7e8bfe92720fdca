"""The tune step on ``cluster.backend: kubernetes`` against a real API server, as the pipeline's
ServiceAccount, with the test playing Katib: Trials that succeed, fail and are early-stopped,
the Experiment's status and optimal trial written as Katib's controller writes them.
"""

from __future__ import annotations

import pytest

from cluster.controllers import in_background, play_katib, tune_cfg
from kubetrain.core.errors import KubetrainError
from kubetrain.core.io import read_json
from kubetrain.core.records import SearchSummary
from kubetrain.pipeline import steps

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_the_tune_step_returns_katibs_best_trial(runner, operator, tiny_dataset, tmp_path, api):
    cfg = tune_cfg(runner.namespace, tmp_path / "claim", "cluster.queue_name=gpu-queue", api=api)
    join = in_background(lambda: play_katib(operator))
    result = steps.tune(cfg, tiny_dataset, tmp_path / "tune")
    join()
    assert result.engine == "katib" and result.training_api == api
    assert result.best_params == {"train.lr": 0.004, "train.batch_size": 32}
    assert result.best_value == 0.93
    assert (result.trials_complete, result.trials_failed, result.trials_pruned) == (
        1,
        1,
        1,
    )
    trials = read_json(tmp_path / "tune" / "trials.json")
    states = {t["name"].rsplit("-t-", 1)[1]: t["state"] for t in trials}
    assert states == {"ok": "complete", "failed": "fail", "stopped": "pruned"}
    (failed,) = [t for t in trials if t["state"] == "fail"]
    assert failed["error"].startswith("TrialFailed: Trial has failed")
    assert SearchSummary.read(tmp_path / "tune" / "best_params.json") == result
    # the train step applies them as it does the local engine's
    tuned = steps.tuned_config(cfg, tmp_path / "tune" / "best_params.json")
    assert (tuned.train.lr, tuned.train.batch_size) == (0.004, 32)
    assert operator.objects("experiments", "v1beta1") == []  # cleanup on_success
    assert list((tmp_path / "claim" / "jobs").iterdir()) == []
    if api == "trainjob":
        # the trials' TrainJobs, made from the template as Katib makes them, were accepted by
        # the server's TrainJob schema, carry the trial's parameters and join the queue
        jobs = {j["metadata"]["name"].rsplit("-t-", 1)[1]: j for j in operator.objects("trainjobs")}
        assert set(jobs) == {"ok", "failed", "stopped"}
        assert "train.lr=0.004" in jobs["ok"]["spec"]["trainer"]["command"]
        assert jobs["ok"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert jobs["ok"]["status"]["conditions"][0]["type"] == "Complete"
        assert jobs["failed"]["status"]["conditions"][0]["type"] == "Failed"


def test_a_failed_experiment_names_katibs_reason_and_is_kept(
    runner, operator, tiny_dataset, tmp_path
):
    cfg = tune_cfg(runner.namespace, tmp_path / "claim")
    join = in_background(lambda: play_katib(operator, outcome="Failed"))
    with pytest.raises(
        KubetrainError,
        match=r"experiment \S+/kubetrain-tune-\w+ failed: ExperimentMaxFailedTrialsReached: ",
    ) as err:
        steps.tune(cfg, tiny_dataset, tmp_path / "tune")
    join()
    assert "\n" not in str(err.value)
    assert len(operator.objects("experiments", "v1beta1")) == 1  # kept to inspect
    assert not (tmp_path / "tune").exists()


@pytest.mark.parametrize(
    "where, kind, expected",
    [
        # a namespace whose name says "namespace": the message names it, the verdict must not
        # depend on that
        ("my-namespace", "optimizationjob",
         r"no optimizationjobs.trainer.kubeflow.org/v1alpha1 resource"),
        ("no-such-namespace", "pytorchjob", r"cannot create pytorchjob no-such-namespace-\w+/"
         r"kubetrain-train-x: not found \(namespaces \"no-such-namespace-\w+\" not found\)"),
    ],
    ids=["kind-not-served", "namespace-missing"],
)  # fmt: skip
def test_a_kind_the_server_does_not_serve_is_one_line(
    control_plane, admin, monkeypatch, where, kind, expected
):
    """What a cluster without the operator answers (here: Trainer's OptimizationJob, whose CRD
    is not installed; as admin: our Role would refuse the unknown kind before the server
    looked), told apart from a namespace that does not exist by the Status's details, not by
    the words in the message."""
    import secrets

    from kubernetes import client

    from kubetrain.launch.kubeapi import KubeApi, KubeApiError, Resource
    from kubetrain.launch.kubernetes import TRAIN_JOB

    namespace = f"{where}-{secrets.token_hex(3)}"
    if where == "my-namespace":
        client.CoreV1Api(admin).create_namespace({"metadata": {"name": namespace}})
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    api = KubeApi(namespace)
    resource = {
        "optimizationjob": Resource(
            "trainer.kubeflow.org", "v1alpha1", "optimizationjobs", "OptimizationJob"
        ),
        "pytorchjob": TRAIN_JOB,
    }[kind]
    body = {"apiVersion": f"{resource.group}/{resource.version}", "kind": resource.kind,
            "metadata": {"name": "kubetrain-train-x"}, "spec": {}}  # fmt: skip
    with pytest.raises(KubeApiError, match=expected) as e:
        api.create(resource, body)
    assert e.value.status == 404 and "\n" not in str(e.value)
