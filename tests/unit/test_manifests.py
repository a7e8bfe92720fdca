"""manifests/: every overlay rendered by kustomize, checked against the Kubernetes schemas and the
official Kubeflow models, and held to the restricted pod-security profile and least privilege.

Offline: only the platform/ kustomizations (remote, pinned upstream bases) need the network; their
render test runs only with KUBETRAIN_REMOTE_TESTS=1 (github.com reachable; no probe otherwise).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import kubetrain
from kubetrain.launch.image import DEFAULT_RUNTIME_IMAGE
from tests.conftest import needs_github

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
OVERLAYS = ("kind", "gpu")
K8S_VERSION = "1.32.0"  # kubectl here and kind's default node image

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed"
)


def kustomize(path: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"kubectl kustomize {path}: {done.stderr.strip()}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(MANIFESTS / "overlays" / overlay))


def of_kind(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in rendered(overlay) if d["kind"] == kind]


def pod_templates(overlay: str) -> dict[str, dict[str, Any]]:
    """``{"PyTorchJob/kubetrain-train/Master": pod template}`` for every task."""
    found = {}
    for doc in rendered(overlay):
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "PyTorchJob":
            for role, spec in doc["spec"]["pytorchReplicaSpecs"].items():
                found[f"{name}/{role}"] = spec["template"]
        elif doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            found[name] = doc["spec"]["template"]
    return found


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


pytestmark = needs_kubectl


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_object(overlay):
    kinds = sorted(d["kind"] for d in rendered(overlay))
    assert kinds == sorted(
        ["ConfigMap", "Namespace", "NetworkPolicy", "PersistentVolumeClaim",
         "PersistentVolumeClaim", "PyTorchJob", "Role", "RoleBinding", "ServiceAccount"]
    )  # fmt: skip
    for doc in rendered(overlay):
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "kubetrain", doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kubetrain"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_match_the_kubernetes_schemas(overlay):
    validated = []
    for doc in rendered(overlay):
        if doc["apiVersion"].startswith("kubeflow.org/"):
            continue  # custom resources: see the official-model test below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on a bad field
        validated.append(doc["kind"])
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim"} <= set(
        validated
    )


def test_the_schema_check_catches_a_misspelt_field():
    pvc = next(d for d in rendered("kind") if d["kind"] == "PersistentVolumeClaim")
    broken = json.loads(json.dumps(pvc))
    broken["spec"]["accessMode"] = broken["spec"].pop("accessModes")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def _pytorchjob_round_trip(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` through the official model: fields the model does not know are dropped."""
    from kubeflow.training.api_client import ApiClient

    class _Response:  # what ApiClient.deserialize reads
        data = json.dumps(doc)

    client = ApiClient()
    return client.sanitize_for_serialization(
        client.deserialize(_Response(), "KubeflowOrgV1PyTorchJob")
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pytorchjob_matches_the_official_model(overlay):
    (job,) = of_kind(overlay, "PyTorchJob")
    assert _pytorchjob_round_trip(job) == job
    for template in pod_templates(overlay).values():  # the pod templates against the core schema
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, **template}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_the_model_check_catches_a_misspelt_field():
    (job,) = of_kind("kind", "PyTorchJob")
    broken = json.loads(json.dumps(job))
    broken["spec"]["runPolicy"]["cleanPodPolicies"] = broken["spec"]["runPolicy"].pop(
        "cleanPodPolicy"
    )
    assert _pytorchjob_round_trip(broken) != broken


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_task_is_restricted_and_sized(overlay):
    templates = pod_templates(overlay)
    assert templates, "no task rendered"
    for where, template in templates.items():
        spec = template["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, where
        assert pod_sc["runAsUser"] != 0, where
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        for c in containers(template):
            at = f"{where}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, at
            assert sc["readOnlyRootFilesystem"] is True, at
            assert sc["runAsNonRoot"] is True, at
            assert sc["capabilities"]["drop"] == ["ALL"], at
            assert "add" not in sc["capabilities"], at
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", at
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{at}: {bound}"
            # A read-only root needs a writable /tmp (the image points its caches there).
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, at
            image, _, tag = c["image"].rpartition(":")
            assert image and tag and tag != "latest", f"{at}: image {c['image']} has no fixed tag"


def test_training_pods_are_fenced_by_a_network_policy():
    (policy,) = of_kind("kind", "NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for where, template in pod_templates("kind").items():
        labels = template["metadata"]["labels"]
        assert selector.items() <= labels.items(), where
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]


def test_namespace_enforces_the_restricted_profile():
    (ns,) = of_kind("kind", "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_kind_overlay_runs_the_runtime_image_of_this_version_on_cpu():
    for where, template in pod_templates("kind").items():
        for c in containers(template):
            assert c["image"] == DEFAULT_RUNTIME_IMAGE, where
            assert "nvidia.com/gpu" not in c["resources"]["limits"], where
            assert _cpu(c["resources"]["requests"]["cpu"]) <= 0.5, where  # fits a laptop's kind
        assert "nodeSelector" not in template["spec"], where


def test_gpu_overlay_runs_the_trainer_image_on_gpu_nodes():
    trainer = f"ghcr.io/kubetrain/kubetrain-trainer:{kubetrain.__version__}"
    for where, template in pod_templates("gpu").items():
        spec = template["spec"]
        assert all(c["image"] == trainer for c in containers(template)), where
        (train,) = spec["containers"]
        assert train["resources"]["limits"]["nvidia.com/gpu"] == "1", where
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, where
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ], where
    for pvc in of_kind("gpu", "PersistentVolumeClaim"):  # replicas on several nodes share them
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_image_tags_are_set_only_in_overlays():
    base = kustomize(MANIFESTS / "base")
    for doc in base:
        if doc["kind"] == "PyTorchJob":
            for spec in doc["spec"]["pytorchReplicaSpecs"].values():
                for c in containers(spec["template"]):
                    assert ":" not in c["image"].rsplit("/", 1)[-1], c["image"]


def test_role_is_least_privilege():
    (role,) = of_kind("kind", "Role")
    writes, reads = set(), set()
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert "*" not in rule["apiGroups"], rule
        for resource in rule["resources"]:
            target = (rule["apiGroups"][0], resource)
            reads.add(target)
            if set(rule["verbs"]) - {"get", "list", "watch"}:
                writes.add(target)
                assert set(rule["verbs"]) <= {"create", "get", "list", "watch", "delete"}, rule
    assert writes == {
        ("kubeflow.org", "pytorchjobs"), ("kubeflow.org", "experiments"),
        ("trainer.kubeflow.org", "trainjobs"),
    }  # fmt: skip
    assert {("", "pods"), ("", "pods/log"), ("kubeflow.org", "trials")} <= reads
    assert not any(r in ("secrets", "pods/exec", "configmaps") for _, r in reads)
    (binding,) = of_kind("kind", "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (sa,) = of_kind("kind", "ServiceAccount")
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "kubetrain"} in (
        binding["subjects"]
    )


def test_training_job_commands_match_the_package():
    """The job's config validates, its torchrun shape matches the replicas, its flags exist."""
    from kubetrain.pipeline.config import load_config

    (job,) = of_kind("kind", "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    cfg = load_config(MANIFESTS / "base" / "config.json")
    replicas = sum(s["replicas"] for s in specs.values())
    assert cfg.train.nnodes == replicas
    for spec in specs.values():
        pod = spec["template"]["spec"]
        (train,) = pod["containers"]
        assert train["name"] == "pytorch"  # the operator's container name
        cmd = train["command"]
        assert f"--nnodes={replicas}" in cmd and f"--nproc-per-node={cfg.train.nproc}" in cmd
        module = cmd[cmd.index("-m", 3) + 1]
        _assert_flags_exist(train["command"], [sys.executable, "-m", module])
        for init in pod["initContainers"]:  # `kubetrain <step> ...`
            _assert_flags_exist(
                init["command"], [sys.executable, "-m", "kubetrain.cli", init["command"][1]]
            )


@cache
def _help(argv: tuple[str, ...]) -> str:
    return subprocess.run([*argv, "--help"], capture_output=True, text=True, check=True).stdout


def _assert_flags_exist(command: list[str], argv: list[str]) -> None:
    for flag in (a for a in command if a.startswith("--") and "=" not in a):
        assert flag in _help(tuple(argv)), f"{' '.join(argv)} has no {flag}"


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


# --- platform/: pinned upstream installs ------------------------------------------------------

PINS = {
    "kfp-cluster-scoped": r"github\.com/kubeflow/pipelines//.*\?ref=2\.\d+\.\d+$",
    "kfp": r"github\.com/kubeflow/pipelines//.*\?ref=2\.\d+\.\d+$",
    "training-operator": r"github\.com/kubeflow/training-operator//.*\?ref=v1\.9\.\d+$",
    "katib": r"github\.com/kubeflow/katib//.*\?ref=v0\.19\.\d+$",
}


@pytest.mark.parametrize("part", sorted(PINS))
def test_platform_is_pinned_to_a_release(part):
    kustomization = yaml.safe_load(
        (MANIFESTS / "platform" / part / "kustomization.yaml").read_text()
    )
    (resource,) = kustomization["resources"]
    assert re.search(PINS[part], resource), resource


@pytest.mark.parametrize("part", sorted(PINS))
def test_platform_renders(part):
    needs_github("manifests/platform/ (remote bases, pinned refs)")
    docs = kustomize(MANIFESTS / "platform" / part)
    assert docs, part


def test_the_gpu_overlay_shows_kueue_queues_for_its_nodes():
    """The example is not applied with the overlay (no Kueue CRDs in a plain cluster, nor in the
    test API server): its objects are checked for what they promise."""
    path = ROOT / "manifests" / "overlays" / "gpu" / "kueue-queues.yaml"
    docs = {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}
    assert set(docs) == {"ResourceFlavor", "ClusterQueue", "LocalQueue"}
    assert {d["apiVersion"] for d in docs.values()} == {"kueue.x-k8s.io/v1beta2"}
    local = docs["LocalQueue"]
    assert (local["metadata"]["name"], local["metadata"]["namespace"]) == ("gpu-queue", "kubetrain")
    assert local["spec"]["clusterQueue"] == docs["ClusterQueue"]["metadata"]["name"]
    (group,) = docs["ClusterQueue"]["spec"]["resourceGroups"]
    assert "nvidia.com/gpu" in group["coveredResources"]
    assert group["flavors"][0]["name"] == docs["ResourceFlavor"]["metadata"]["name"]
    overlay = yaml.safe_load((path.parent / "kustomization.yaml").read_text())
    assert path.name not in overlay["resources"]
    gpu_recipe = yaml.safe_load((ROOT / "src/kubetrain/pipeline/recipes/gpu.yaml").read_text())
    assert docs["ResourceFlavor"]["spec"]["nodeLabels"] == gpu_recipe["cluster"]["node_selector"]
