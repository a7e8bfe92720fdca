"""The test in the controllers' place (Training Operator, Katib, kubelet), and the pipeline's
identity from our own manifests."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.controlplane import ROOT, free_port
from kubetrain.pipeline.config import PipelineConfig, load_config

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


# -- the Training Operator's part -----------------------------------------------------------

IMAGE = "registry.example/kubetrain:test"


def cluster_cfg(namespace: str, claim: Path, *settings: str) -> PipelineConfig:
    claim.mkdir(exist_ok=True)
    return load_config(
        None,
        [
            "cluster.backend=kubernetes", f"cluster.namespace={namespace}",
            f"cluster.image={IMAGE}", f"cluster.mount_path={claim}",
            "cluster.poll_seconds=1", "cluster.wait_timeout_seconds=120",
            "train.nproc=1", "train.epochs=1", "tune.enabled=false", *settings,
        ],
    )  # fmt: skip


def master(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]


def run_the_master(job: dict) -> None:
    """What the pod would do: the container's command with the operator's variables."""
    container = master(job)
    values = {"RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    command = [sys.executable if a == "python" else a for a in container["command"]]
    for key, value in values.items():
        command = [a.replace(f"$({key})", value) for a in command]
    env = dict(os.environ, **{e["name"]: e["value"] for e in container["env"]}, **values)
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run(command, env=env, check=True, timeout=300)


def write_model(job: dict) -> None:
    """A stand-in model where the job's command says it goes (tests that do not train)."""
    cmd = master(job)["command"]
    model = Path(cmd[cmd.index("--output") + 1])
    model.mkdir(parents=True)
    (model / "model.json").write_text("{}")
    (model / "metrics.json").write_text("{}")


def play_success(op: Operator, train=write_model, between=lambda: None) -> dict:
    """Created -> Running (a master pod) -> the work -> Succeeded, as the operator writes them."""
    job = op.created("pytorchjobs")
    name = job["metadata"]["name"]
    created = tc_condition("Created", "PyTorchJobCreated", f"PyTorchJob {name} is created.")
    op.conditions("pytorchjobs", name, [created])
    op.pod(f"{name}-master-0", name, "Running", {"state": {"running": {}}})
    running = tc_condition("Running", "PyTorchJobRunning", f"PyTorchJob {name} is running.")
    op.conditions(
        "pytorchjobs", name, [created, running], replicaStatuses={"Master": {"active": 1}}
    )
    between()
    train(job)
    done = tc_condition(
        "Succeeded", "PyTorchJobSucceeded", f"PyTorchJob {op.ns}/{name} successfully completed."
    )
    running["status"] = "False"
    op.conditions(
        "pytorchjobs", name, [created, running, done], replicaStatuses={"Master": {"succeeded": 1}}
    )
    return job


# -- Katib's part ------------------------------------------------------------------------------

SEARCH = [
    "tune.enabled=true",
    "tune.max_trials=3",
    "tune.parameters=[{name: train.lr, parameterType: double, feasibleSpace: {min: 0.001, "
    "max: 0.1}}, {name: train.batch_size, parameterType: categorical, "
    "feasibleSpace: {list: [32, 64]}}]",
]


def tune_cfg(namespace: str, claim: Path, *settings: str) -> PipelineConfig:
    claim.mkdir(exist_ok=True)
    return load_config(
        None,
        [
            "cluster.backend=kubernetes", f"cluster.namespace={namespace}",
            "cluster.image=registry.example/kubetrain:test", f"cluster.mount_path={claim}",
            "cluster.poll_seconds=1", "cluster.wait_timeout_seconds=120", *SEARCH, *settings,
        ],
    )  # fmt: skip


def assignments(lr: str, batch: str) -> list[dict[str, str]]:
    return [{"name": "train-lr", "value": lr}, {"name": "train-batch_size", "value": batch}]


def observation(accuracy: str) -> dict:
    return {"metrics": [{"name": "val_accuracy", "latest": accuracy, "max": accuracy,
                         "min": accuracy}]}  # fmt: skip


# name -> (parameters, final condition, observed val_accuracy)
TRIALS = {
    "t-ok": (assignments("0.004", "32"), ("Succeeded", "TrialSucceeded", "Trial has succeeded"),
             "0.93"),
    "t-failed": (assignments("0.09", "64"), ("Failed", "TrialFailed",
                 "Trial has failed. Job message: PyTorchJob failed because 1 Master replica(s) "
                 "failed."), None),
    "t-stopped": (assignments("0.05", "32"), ("EarlyStopped", "TrialEarlyStopped",
                  "Trial is early stopped"), "0.41"),
}  # fmt: skip


def play_katib(op: Operator, outcome: str = "Succeeded") -> str:
    exp = op.created("experiments", "v1beta1")
    name = exp["metadata"]["name"]
    created = tc_condition("Created", "ExperimentCreated", "Experiment is created")
    op.conditions("experiments", name, [created], version="v1beta1")
    running = tc_condition("Running", "ExperimentRunning", "Experiment is running")
    op.conditions("experiments", name, [created, running], version="v1beta1", trialsRunning=3)
    for trial, (params, (kind, reason, message), accuracy) in TRIALS.items():
        op.custom.create_namespaced_custom_object(
            "kubeflow.org", "v1beta1", op.ns, "trials",
            {
                "apiVersion": "kubeflow.org/v1beta1", "kind": "Trial",
                "metadata": {"name": f"{name}-{trial}",
                             "labels": {"katib.kubeflow.org/experiment": name}},
                "spec": {"parameterAssignments": params,
                         "objective": exp["spec"]["objective"]},
            },
        )  # fmt: skip
        status = {"conditions": [tc_condition(kind, reason, message)]}
        if accuracy is not None:
            status["observation"] = observation(accuracy)
        op.custom.patch_namespaced_custom_object_status(
            "kubeflow.org", "v1beta1", op.ns, "trials", f"{name}-{trial}", {"status": status}
        )
    running["status"] = "False"
    if outcome == "Succeeded":
        params, _, accuracy = TRIALS["t-ok"]
        final = tc_condition("Succeeded", "ExperimentMaxTrialsReached",
                             "Experiment has succeeded because max trial count has reached")  # fmt: skip
        op.conditions(
            "experiments", name, [created, running, final], version="v1beta1",
            trialsSucceeded=1, trialsFailed=1, trialsEarlyStopped=1, trials=3,
            currentOptimalTrial={"bestTrialName": f"{name}-t-ok", "parameterAssignments": params,
                                 "observation": observation(accuracy)},
        )  # fmt: skip
    else:
        final = tc_condition("Failed", "ExperimentMaxFailedTrialsReached",
                             "Experiment has failed because max failed count has reached")  # fmt: skip
        op.conditions("experiments", name, [created, running, final], version="v1beta1",
                      trialsFailed=1, trials=3)  # fmt: skip
    return name
