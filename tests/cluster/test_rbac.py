"""Least privilege, proven against a real API server with RBAC on: the pipeline's ServiceAccount
from our own manifests (a TokenRequest token) runs the launchers, and the API server's audit log
shows they used every permission of the Role and nothing else; the same account is refused in
another namespace, on Secrets and on cluster-scoped objects.
"""

from __future__ import annotations

import pytest

from cluster.controllers import (
    cluster_cfg,
    condition_v2,
    in_background,
    play_katib,
    play_success,
    play_trainjob,
    rendered,
    tc_condition,
    tune_cfg,
)
from kubetrain.core.errors import KubetrainError
from kubetrain.launch.kubeapi import KubeApi, KubeApiError
from kubetrain.launch.kubernetes import TRAIN_JOB, build_pytorchjob
from kubetrain.pipeline import steps

pytestmark = pytest.mark.cluster


def role_permissions() -> set[tuple[str, str, str]]:
    """(apiGroup, resource[/subresource], verb) that manifests/base/rbac.yaml grants."""
    (role,) = [d for d in rendered() if d["kind"] == "Role"]
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def used_permissions(events: list[dict]) -> tuple[set, set]:
    """(permissions used and allowed, permissions asked for and refused) from audit events."""
    used, refused = set(), set()
    for event in events:
        ref = event.get("objectRef") or {}
        if not ref.get("resource"):
            continue  # non-resource URLs (discovery)
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        permission = (ref.get("apiGroup", ""), resource, event["verb"])
        code = (event.get("responseStatus") or {}).get("code", 200)
        (refused if code == 403 else used).add(permission)
    return used, refused


def test_the_launchers_use_every_permission_of_the_role_and_no_other(
    control_plane, runner, operator, tiny_dataset, tmp_path
):
    # a training that succeeds (its job is deleted), one that fails (deleted: cleanup=always),
    # and a search, with each training API (auto asks which one is served): everything a
    # pipeline run does on the cluster
    cfg = cluster_cfg(runner.namespace, tmp_path / "claim")
    join = in_background(lambda: play_success(operator))
    steps.train(cfg, tiny_dataset, tmp_path / "model")
    join()

    def fail():
        job = operator.created("pytorchjobs")
        failed = tc_condition("Failed", "PyTorchJobFailed", "1 Master replica(s) failed.")
        operator.conditions("pytorchjobs", job["metadata"]["name"], [failed])

    join = in_background(fail)
    with pytest.raises(KubetrainError, match="failed: PyTorchJobFailed"):
        steps.train(
            cluster_cfg(runner.namespace, tmp_path / "claim", "cluster.cleanup=always"),
            tiny_dataset, tmp_path / "model2",
        )  # fmt: skip
    join()
    join = in_background(lambda: play_katib(operator))
    steps.tune(tune_cfg(runner.namespace, tmp_path / "claim"), tiny_dataset, tmp_path / "tune")
    join()

    join = in_background(lambda: play_trainjob(operator))
    steps.train(cluster_cfg(runner.namespace, tmp_path / "claim", api="auto"), tiny_dataset,
                tmp_path / "model3")  # fmt: skip
    join()

    def fail_trainjob():
        job = operator.created("trainjobs")
        failed = condition_v2("Failed", "FailedJobs", "jobset failed due to reaching max restarts")
        operator.conditions("trainjobs", job["metadata"]["name"], [failed])

    join = in_background(fail_trainjob)
    with pytest.raises(KubetrainError, match="failed: FailedJobs"):
        steps.train(
            cluster_cfg(runner.namespace, tmp_path / "claim", "cluster.cleanup=always",
                        api="trainjob"),
            tiny_dataset, tmp_path / "model4",
        )  # fmt: skip
    join()
    join = in_background(lambda: play_katib(operator))
    steps.tune(
        tune_cfg(runner.namespace, tmp_path / "claim", api="auto"), tiny_dataset, tmp_path / "t2"
    )
    join()

    used, refused = used_permissions(control_plane.audit(runner.username))
    assert used == role_permissions()
    # the one refusal by design: the namespace check, which namespaced RBAC cannot pass
    assert refused == {("", "namespaces", "get")}


ALLOWED = [
    ("create", "kubeflow.org", "pytorchjobs", ""),
    ("create", "trainer.kubeflow.org", "trainjobs", ""),
    ("watch", "trainer.kubeflow.org", "trainjobs", ""),
    ("delete", "trainer.kubeflow.org", "trainjobs", ""),
    ("watch", "kubeflow.org", "experiments", ""),
    ("list", "kubeflow.org", "trials", ""),
    ("get", "", "pods", "log"),
]
REFUSED = [
    ("create", "kubeflow.org", "pytorchjobs", "", "other-namespace"),
    ("list", "", "secrets", "", None),
    ("get", "", "secrets", "", None),
    ("create", "", "pods", "exec", None),
    ("create", "", "pods", "", None),
    ("update", "kubeflow.org", "pytorchjobs", "status", None),
    ("get", "kubeflow.org", "pytorchjobs", "", None),
    ("list", "", "namespaces", "", ""),
    ("list", "apiextensions.k8s.io", "customresourcedefinitions", "", ""),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings", "", ""),
    ("list", "kubeflow.org", "pytorchjobs", "", ""),
    ("update", "trainer.kubeflow.org", "trainjobs", "status", None),
    ("patch", "trainer.kubeflow.org", "trainjobs", "", None),
    ("create", "trainer.kubeflow.org", "trainjobs", "", "other-namespace"),
    ("list", "trainer.kubeflow.org", "clustertrainingruntimes", "", ""),
    ("create", "jobset.x-k8s.io", "jobsets", "", None),
]


def _review(runner, verb, group, resource, subresource, where):
    """SelfSubjectAccessReview; ``where``: a namespace, None (the runner's), "" (cluster)."""
    from kubernetes import client

    from kubetrain.launch.kubeapi import KubeApi

    auth = client.AuthorizationV1Api(KubeApi(runner.namespace).api_client)
    attrs = {"verb": verb, "group": group, "resource": resource, "subresource": subresource}
    if where != "":
        attrs["namespace"] = where or runner.namespace
    answer = auth.create_self_subject_access_review({"spec": {"resourceAttributes": attrs}})
    return answer.status.allowed


@pytest.mark.parametrize(("verb", "group", "resource", "subresource"), ALLOWED,
                         ids=[f"{v}-{r}{'-' + s if s else ''}" for v, _, r, s in ALLOWED])  # fmt: skip
def test_the_account_may_do_what_the_pipeline_does(runner, verb, group, resource, subresource):
    assert _review(runner, verb, group, resource, subresource, None)


@pytest.mark.parametrize(
    ("verb", "group", "resource", "subresource", "where"), REFUSED,
    ids=[f"{v}-{r}{'-' + s if s else ''}-{'cluster' if n == '' else n or 'own'}"
         for v, _, r, s, n in REFUSED],
)  # fmt: skip
def test_the_account_is_refused_everything_else(runner, verb, group, resource, subresource, where):
    assert not _review(runner, verb, group, resource, subresource, where)


def test_the_accounts_rules_are_the_role(runner):
    """SelfSubjectRulesReview: what the server says the account may do in its namespace."""
    from kubernetes import client

    auth = client.AuthorizationV1Api(KubeApi(runner.namespace).api_client)
    review = auth.create_self_subject_rules_review({"spec": {"namespace": runner.namespace}})
    granted = {
        (group, resource, verb)
        for rule in review.status.resource_rules
        for group in rule.api_groups
        for resource in rule.resources
        for verb in rule.verbs
        # every authenticated user may ask who it is and what it may do (system:basic-user)
        if group not in ("authorization.k8s.io", "authentication.k8s.io")
    }
    assert granted == role_permissions()


def test_refusals_are_one_line(runner, operator, tmp_path):
    """Another namespace that exists, and a Secret in its own, for real."""
    from kubernetes import client

    other = f"{runner.namespace}-other"
    operator.core.create_namespace({"metadata": {"name": other}})
    cfg = cluster_cfg(other, tmp_path / "claim")
    api = KubeApi(other)
    with pytest.raises(KubeApiError, match=rf"not allowed to create pytorchjob {other}/") as e:
        api.create(TRAIN_JOB, build_pytorchjob(cfg, "kubetrain-train-elsewhere"))
    assert e.value.status == 403 and "\n" not in str(e.value)
    own = KubeApi(runner.namespace)
    with pytest.raises(client.ApiException) as denied:
        client.CoreV1Api(own.api_client).list_namespaced_secret(runner.namespace)
    assert denied.value.status == 403
    assert "\n" not in str(own.error(denied.value, "list", "secrets"))
