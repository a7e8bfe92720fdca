"""The test in the controllers' place (Training Operator v1, Trainer v2 with JobSet, Kueue,
Katib, kubelet), and the pipeline's identity from our own manifests."""

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
from factories import train_summary
from kubetrain.pipeline.config import load_config

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


# plural -> (API group, version) of what the controllers write
APIS = {
    "pytorchjobs": ("kubeflow.org", "v1"),
    "experiments": ("kubeflow.org", "v1beta1"),
    "trials": ("kubeflow.org", "v1beta1"),
    "trainjobs": ("trainer.kubeflow.org", "v1alpha1"),
}


def condition_v2(kind: str, reason: str, message: str, status: str = "True") -> dict[str, Any]:
    """A status condition as Trainer v2 writes them (``metav1.Condition``)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": now}  # fmt: skip


class Operator:
    """Writes what the controllers would, with admin rights, in one namespace."""

    def __init__(self, admin: Any, namespace: str):
        from kubernetes import client

        self.ns = namespace
        self.custom = client.CustomObjectsApi(admin)
        self.core = client.CoreV1Api(admin)

    @staticmethod
    def _gv(plural: str, version: str | None) -> tuple[str, str]:
        group, default = APIS[plural]
        return group, version or default

    def objects(self, plural: str, version: str | None = None) -> list[dict[str, Any]]:
        group, version = self._gv(plural, version)
        found = self.custom.list_namespaced_custom_object(group, version, self.ns, plural)
        return found["items"]

    def created(
        self, plural: str, version: str | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        """The first object of ``plural`` once the launcher has created it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            items = self.objects(plural, version)
            if items:
                return items[0]
            time.sleep(0.1)
        raise AssertionError(f"no {plural} was created in {self.ns} within {timeout} s")

    def conditions(self, plural, name, conditions, version=None, **extra) -> None:
        """Write ``status`` through the status subresource, conditions accumulated in order."""
        group, version = self._gv(plural, version)
        status = {"conditions": conditions, **extra}
        self.custom.patch_namespaced_custom_object_status(
            group, version, self.ns, plural, name, {"status": status}
        )

    def suspend(self, plural: str, name: str, suspended: bool) -> None:
        """What Kueue does to a job of its queue: suspend it (its webhook, at creation) and
        un-suspend it once admitted."""
        group, version = self._gv(plural, None)
        spec = {"suspend": suspended}
        if plural == "pytorchjobs":
            spec = {"runPolicy": {"suspend": suspended}}
        self.custom.patch_namespaced_custom_object(
            group, version, self.ns, plural, name, {"spec": spec}
        )

    def pod(
        self, name: str, job: str, phase: str, container_status: dict[str, Any],
        labels: dict[str, str] | None = None, container: str = "pytorch",
    ) -> None:  # fmt: skip
        """A job's pod as the operator creates it, with the status the kubelet would write."""
        if labels is None:
            labels = {
                "training.kubeflow.org/job-name": job,
                "training.kubeflow.org/replica-type": "master",
                "training.kubeflow.org/job-role": "master",
            }
        self.core.create_namespaced_pod(
            self.ns,
            {
                "metadata": {"name": name, "labels": labels},
                "spec": {"containers": [{"name": container, "image": "registry.example/k:1"}]},
            },
        )
        status = {
            "phase": phase,
            "containerStatuses": [
                {"name": container, "image": "registry.example/k:1", "imageID": "",
                 "ready": phase == "Running", "restartCount": 0, **container_status},
            ],
        }  # fmt: skip
        self.core.patch_namespaced_pod_status(name, self.ns, {"status": status})

    def node_pod(self, job: str, phase: str, container_status: dict[str, Any]) -> str:
        """Node 0 of a TrainJob, as JobSet names and labels it (the JobSet is the TrainJob's
        namesake; its replicated job ``node``)."""
        name = f"{job}-node-0-0-x7k2p"
        labels = {
            "jobset.sigs.k8s.io/jobset-name": job,
            "jobset.sigs.k8s.io/replicatedjob-name": "node",
            "jobset.sigs.k8s.io/job-index": "0",
            "batch.kubernetes.io/job-completion-index": "0",
            "trainer.kubeflow.org/trainjob-ancestor-step": "trainer",
        }
        self.pod(name, job, phase, container_status, labels=labels, container="node")
        return name


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


def cluster_cfg(namespace: str, claim: Path, *settings: str, api: str = "pytorchjob"):
    claim.mkdir(exist_ok=True)
    return load_config(
        None,
        [
            "cluster.backend=kubernetes", f"cluster.namespace={namespace}",
            f"cluster.image={IMAGE}", f"cluster.mount_path={claim}",
            "cluster.poll_seconds=1", "cluster.wait_timeout_seconds=120",
            f"cluster.training_api={api}",
            "train.nproc=1", "train.epochs=1", "tune.enabled=false", *settings,
        ],
    )  # fmt: skip


def master(job: dict) -> dict:
    if job["kind"] == "TrainJob":
        return job["spec"]["trainer"]
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]


def run_the_master(job: dict) -> None:
    """What the pod would do: the container's command with the operator's variables (a
    TrainJob's: the PET_* variables the torch runtime injects)."""
    container = master(job)
    port = str(free_port())
    if job["kind"] == "TrainJob":
        values = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "0",
                  "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port}  # fmt: skip
    else:
        values = {"RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    command = [sys.executable if a == "python" else a for a in container["command"]]
    for key, value in values.items():
        command = [a.replace(f"$({key})", value) for a in command]
    assert not any("$(" in a for a in command), command
    plain = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env = dict(os.environ, **plain, **values)
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run(command, env=env, check=True, timeout=300)


def write_model(job: dict) -> None:
    """A stand-in model where the job's command says it goes (tests that do not train)."""
    cmd = master(job)["command"]
    model = Path(cmd[cmd.index("--output") + 1])
    model.mkdir(parents=True)
    (model / "model.json").write_text("{}")
    train_summary().write(model / "metrics.json")


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


def jobs_status(**counts: int) -> list[dict[str, Any]]:
    """TrainJob ``status.jobsStatus`` of the ``node`` replicated job, as JobSet counts them."""
    base = {"ready": 0, "succeeded": 0, "failed": 0, "active": 0, "suspended": 0}
    return [{"name": "node", **base, **counts}]


def play_trainjob(
    op: Operator,
    train=write_model,
    between=lambda: None,
    queue: Callable[[str], None] | None = None,
) -> dict:
    """Trainer v2 (and, with ``queue``, Kueue first): node 0 runs, the work, Complete."""
    job = op.created("trainjobs")
    name = job["metadata"]["name"]
    if queue is not None:
        queue(name)
    op.node_pod(name, "Running", {"state": {"running": {}}})
    op.conditions("trainjobs", name, [], jobsStatus=jobs_status(active=1))
    between()
    train(job)
    complete = condition_v2("Complete", "AllJobsCompleted", "jobset completed successfully")
    op.conditions("trainjobs", name, [complete], jobsStatus=jobs_status(succeeded=1))
    return job


def kueue_admits_after(op: Operator, seconds: float, plural: str = "trainjobs"):
    """Kueue: the job is suspended as it is created, and admitted ``seconds`` later."""

    def queue(name: str) -> None:
        op.suspend(plural, name, True)
        op.conditions(
            plural, name, [condition_v2("Suspended", "Suspended", "TrainJob is suspended")]
        )
        time.sleep(seconds)
        op.suspend(plural, name, False)
        op.conditions(
            plural, name,
            [condition_v2("Suspended", "Resumed", "TrainJob is resumed", status="False")],
        )  # fmt: skip

    return queue


# -- Katib's part ------------------------------------------------------------------------------

SEARCH = [
    "tune.enabled=true",
    "tune.max_trials=3",
    "tune.parameters=[{name: train.lr, parameterType: double, feasibleSpace: {min: 0.001, "
    "max: 0.1}}, {name: train.batch_size, parameterType: categorical, "
    "feasibleSpace: {list: [32, 64]}}]",
]


def tune_cfg(namespace: str, claim: Path, *settings: str, api: str = "pytorchjob"):
    claim.mkdir(exist_ok=True)
    return load_config(
        None,
        [
            "cluster.backend=kubernetes", f"cluster.namespace={namespace}",
            "cluster.image=registry.example/kubetrain:test", f"cluster.mount_path={claim}",
            "cluster.poll_seconds=1", "cluster.wait_timeout_seconds=120",
            f"cluster.training_api={api}", *SEARCH, *settings,
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


# Trial outcome -> the condition Trainer v2 writes on the trial's TrainJob (None: still running
# when Katib stopped it early).
TRIAL_JOB_CONDITION = {
    "Succeeded": ("Complete", "AllJobsCompleted", "jobset completed successfully"),
    "Failed": ("Failed", "FailedJobs", "jobset failed due to reaching max restarts"),
    "EarlyStopped": None,
}


def trial_trainjob(op: Operator, exp: dict, trial: str, params: list[dict], outcome: str) -> None:
    """What Katib's trial controller creates from a TrainJob trial template: the trialSpec with
    the trial's parameters filled in, named after the trial (the API server checks it against
    the TrainJob schema), then its outcome as Trainer v2 writes it."""
    template = exp["spec"]["trialTemplate"]
    text = yaml.safe_dump(template["trialSpec"])
    refs = {p["name"]: p["reference"] for p in template["trialParameters"]}
    values = {a["name"]: a["value"] for a in params}
    for name, reference in refs.items():
        text = text.replace(f"${{trialParameters.{name}}}", values[reference])
    job = yaml.safe_load(text)
    job["metadata"] = {**job.get("metadata", {}), "name": trial, "namespace": op.ns}
    op.custom.create_namespaced_custom_object(
        "trainer.kubeflow.org", "v1alpha1", op.ns, "trainjobs", job, field_validation="Strict"
    )
    done = TRIAL_JOB_CONDITION[outcome]
    if done is not None:
        op.conditions("trainjobs", trial, [condition_v2(*done)])


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
        job_kind = exp["spec"]["trialTemplate"]["trialSpec"]["kind"]
        if job_kind == "TrainJob":
            trial_trainjob(op, exp, f"{name}-{trial}", params, kind)
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
