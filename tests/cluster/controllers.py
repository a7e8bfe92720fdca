"""The test in the controllers' place (Training Operator, Katib, kubelet), and the pipeline's
identity from our own manifests."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.controlplane import ROOT

RUNNER_SA = "kubetrain-pipeline-runner"  # manifests/base/serviceaccount.yaml


# -- the pipeline's identity, from our own manifests ---------------------------------------


def rendered(overlay: str = "kind") -> list[dict[str, Any]]:
    done = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "manifests" / "overlays" / overlay)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def in_namespace(docs: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    """The overlay's objects moved to ``namespace`` (as ``kustomize edit set namespace``)."""
    moved = []
    for doc in docs:
        doc = yaml.safe_load(yaml.safe_dump(doc))
        if doc["kind"] == "Namespace":
            doc["metadata"]["name"] = namespace
        else:
            doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects") or []:
            if subject.get("namespace") == "kubetrain":
                subject["namespace"] = namespace
        moved.append(doc)
    return moved


@dataclass
class Runner:
    """The pipeline's ServiceAccount in ``namespace``, with a real token and kubeconfig."""

    namespace: str
    token: str
    kubeconfig: Path

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{RUNNER_SA}"


# -- the test as the controllers (Training Operator, Katib, kubelet) -----------------------


def tc_condition(kind: str, reason: str, message: str) -> dict[str, Any]:
    """A status condition as the Training Operator / Katib write them."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "type": kind, "status": "True", "reason": reason, "message": message,
        "lastUpdateTime": now, "lastTransitionTime": now,
    }  # fmt: skip


class Operator:
    """Writes what the controllers would, with admin rights, in one namespace."""

    def __init__(self, admin: Any, namespace: str):
        from kubernetes import client

        self.ns = namespace
        self.custom = client.CustomObjectsApi(admin)
        self.core = client.CoreV1Api(admin)

    def objects(self, plural: str, version: str = "v1") -> list[dict[str, Any]]:
        found = self.custom.list_namespaced_custom_object("kubeflow.org", version, self.ns, plural)
        return found["items"]

    def created(self, plural: str, version: str = "v1", timeout: float = 60) -> dict[str, Any]:
        """The first object of ``plural`` once the launcher has created it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            items = self.objects(plural, version)
            if items:
                return items[0]
            time.sleep(0.1)
        raise AssertionError(f"no {plural} was created in {self.ns} within {timeout} s")

    def conditions(self, plural, name, conditions, version="v1", **extra) -> None:
        """Write ``status`` through the status subresource, conditions accumulated in order."""
        status = {"conditions": conditions, **extra}
        self.custom.patch_namespaced_custom_object_status(
            "kubeflow.org", version, self.ns, plural, name, {"status": status}
        )

    def pod(self, name: str, job: str, phase: str, container_status: dict[str, Any]) -> None:
        """A job's pod as the operator creates it, with the status the kubelet would write."""
        self.core.create_namespaced_pod(
            self.ns,
            {
                "metadata": {
                    "name": name,
                    "labels": {
                        "training.kubeflow.org/job-name": job,
                        "training.kubeflow.org/replica-type": "master",
                        "training.kubeflow.org/job-role": "master",
                    },
                },
                "spec": {"containers": [{"name": "pytorch", "image": "registry.example/k:1"}]},
            },
        )
        status = {
            "phase": phase,
            "containerStatuses": [
                {"name": "pytorch", "image": "registry.example/k:1", "imageID": "",
                 "ready": phase == "Running", "restartCount": 0, **container_status},
            ],
        }  # fmt: skip
        self.core.patch_namespaced_pod_status(name, self.ns, {"status": status})


def in_background(fn: Callable[[], Any]) -> Callable[[float], None]:
    """Run ``fn`` in a thread; the returned ``join(timeout)`` re-raises what it raised."""
    errors: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as err:  # surfaced in join
            errors.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join(timeout: float = 120) -> None:
        thread.join(timeout)
        assert not thread.is_alive(), "the test's controller did not finish"
        if errors:
            raise errors[0]

    return join
