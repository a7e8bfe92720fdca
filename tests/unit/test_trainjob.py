"""TrainJob: the builder (golden YAML, the official kubeflow-trainer-api models), the torchrun
command that reads the runtime's PET_* variables, what it refuses, the seam that picks the job
kind (``cluster.training_api``), the watcher's view of a TrainJob. Against a real API server:
tests/cluster/test_trainjob.py."""

from __future__ import annotations

import contextlib
import copy

import pytest
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
from pydantic import ValidationError

from fakes.golden import golden
from kubetrain.core.errors import ConfigError, KubetrainError
from kubetrain.launch.jobkinds import job_kind, offline_kind, resolve_kind
from kubetrain.launch.trainjob import TrainJobWatcher, build_trainjob
from kubetrain.pipeline.config import load_config

JOB = "kubetrain-train-0a1b2c"
GOLDEN_SETTINGS = [
    "cluster.backend=kubernetes",
    "cluster.training_api=trainjob",
    "cluster.namespace=team-a",
    "cluster.image=registry.example/kubetrain:test",
    "train.nnodes=2",
    "train.nproc=1",
    "train.batch_size=64",
    "cluster.num_gpus=1",
    "cluster.cpu=4",
    "cluster.memory=8Gi",
    "cluster.node_selector={pool: gpu}",
    "cluster.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
    "cluster.env={NCCL_DEBUG: WARN}",
    "cluster.service_account=kubetrain-runner",
    "cluster.storage_secret=kubetrain-storage",
    "cluster.active_deadline_seconds=7200",
    "cluster.queue_name=gpu-queue",
    "cluster.priority_class=high",
]


def roundtrip(manifest: dict) -> dict:
    return TrainerV1alpha1TrainJob.from_dict(manifest).to_dict()


def node_patch(job: dict) -> dict:
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    return node["template"]["spec"]["template"]


def test_trainjob_matches_golden_yaml():
    cfg = load_config(None, GOLDEN_SETTINGS)
    assert build_trainjob(cfg, JOB) == golden("trainjob.yaml", build_trainjob(cfg, JOB))


def test_trainjob_survives_a_roundtrip_through_the_official_models():
    job = build_trainjob(load_config(None, GOLDEN_SETTINGS), JOB)
    assert roundtrip(job) == job


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda j: j["spec"]["trainer"].update(numNode=2), id="misspelt-trainer"),
        pytest.param(lambda j: j["spec"].update(runtime={"name": "x"}), id="unknown-spec-field"),
        pytest.param(lambda j: j["spec"]["trainer"].update(numNodes="two"), id="nodes-as-text"),
        pytest.param(
            lambda j: node_patch(j)["spec"]["containers"][0].update(envFrom=[]),
            id="envfrom-in-a-container-patch",
        ),
    ],
)
def test_a_wrong_field_does_not_survive_the_official_models(mutate):
    bad = copy.deepcopy(build_trainjob(load_config(None, GOLDEN_SETTINGS), JOB))
    mutate(bad)
    # Either the models drop what they do not know, or they reject it outright.
    with contextlib.suppress(ValidationError, ValueError):
        assert roundtrip(bad) != bad


def test_the_trainer_is_the_config_and_the_pods_are_patched_as_pytorchjob_pods():
    job = build_trainjob(load_config(None, GOLDEN_SETTINGS), JOB)
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }  # fmt: skip
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 1)
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "8Gi", "nvidia.com/gpu": "1"},
    }
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    pod = node_patch(job)
    assert pod["spec"]["serviceAccountName"] == "kubetrain-runner"
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert pod["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    (container,) = pod["spec"]["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip
    claim = {v["name"]: v for v in pod["spec"]["volumes"]}["data"]
    assert claim["persistentVolumeClaim"] == {"claimName": "kubetrain-data"}
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]} == {
        "data": "/mnt/kubetrain", "dshm": "/dev/shm",
    }  # fmt: skip
    assert "kueue.x-k8s.io/queue-name" not in pod["metadata"]["labels"]  # the job's, not pods'
    # the storage Secret key by key (a TrainJob has no envFrom), each optional
    secret_refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer["env"] if "valueFrom" in e
    }
    assert secret_refs["AWS_SECRET_ACCESS_KEY"] == {
        "name": "kubetrain-storage", "key": "AWS_SECRET_ACCESS_KEY", "optional": True,
    }  # fmt: skip


def test_torchrun_reads_the_runtimes_pet_variables():
    command = build_trainjob(load_config(None, GOLDEN_SETTINGS), JOB)["spec"]["trainer"]["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    for option, variable in [
        ("--nnodes", "PET_NNODES"), ("--nproc-per-node", "PET_NPROC_PER_NODE"),
        ("--node-rank", "PET_NODE_RANK"), ("--master-addr", "PET_MASTER_ADDR"),
        ("--master-port", "PET_MASTER_PORT"),
    ]:  # fmt: skip
        assert f"{option}=$({variable})" in command
    assert command[command.index("-m", 3) + 1] == "kubetrain.launch.worker"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["cluster.env={PET_NNODES: '4'}"], r"cluster.env.PET_NNODES: the TrainJob runtime sets"),
        (["train.nproc=4", "train.batch_size=64"], r"train.nproc \(4\) is more than the CPU"),
        (["data.storage_options={key: AKIA, secret: s}"], r"data.storage_options.key: a cred"),
    ],
    ids=["reserved-env", "nproc-over-cpu", "inline-credential"],
)
def test_what_a_trainjob_cannot_carry_is_one_line(settings, message):
    cfg = load_config(None, ["cluster.image=img:1", "cluster.training_api=trainjob", *settings])
    with pytest.raises(ConfigError, match=message) as err:
        build_trainjob(cfg, JOB)
    assert "\n" not in str(err.value) and err.value.exit_code == 2


def test_elastic_with_trainjob_is_one_line_at_config_time():
    with pytest.raises(ConfigError, match=r"cluster.elastic: TrainJob .*no elastic training API"):
        load_config(None, ["cluster.training_api=trainjob", "cluster.elastic=true"])


# -- the seam ---------------------------------------------------------------------------------


class ServedBy:
    """The API client's discovery answer, as a fake at the API boundary (the real server:
    tests/cluster/test_trainjob.py)."""

    host = "https://127.0.0.1:6443"

    def __init__(self, *served: str):
        self.served_plurals = set(served)
        self.asked: list[str] = []

    def served(self, group: str, version: str) -> set[str]:
        self.asked.append(f"{group}/{version}")
        crds = (crd.split(".", 1) for crd in self.served_plurals)
        return {plural for plural, crd_group in crds if crd_group == group}


BOTH = ("trainjobs.trainer.kubeflow.org", "pytorchjobs.kubeflow.org")
# (training_api, elastic, served) -> the kind, or the error's words
SEAM = [
    ("auto", False, BOTH, "trainjob"),
    ("auto", False, BOTH[1:], "pytorchjob"),
    ("auto", False, BOTH[:1], "trainjob"),
    ("auto", True, BOTH, "pytorchjob"),
    ("auto", True, BOTH[:1], "no elastic training API"),
    ("auto", False, (), "serves neither trainjobs.trainer.kubeflow.org"),
    ("trainjob", False, (), "trainjob"),
    ("pytorchjob", False, (), "pytorchjob"),
]


@pytest.mark.parametrize(
    ("api", "elastic", "served", "expected"), SEAM,
    ids=["auto-both", "auto-v1-only", "auto-v2-only", "auto-elastic-both",
         "auto-elastic-v2-only", "auto-neither", "trainjob-unasked", "pytorchjob-unasked"],
)  # fmt: skip
def test_the_kind_is_what_the_server_serves_fake_discovery(api, elastic, served, expected):
    cfg = load_config(
        None, [f"cluster.training_api={api}", f"cluster.elastic={str(elastic).lower()}"]
    )
    fake = ServedBy(*served)
    if expected in ("trainjob", "pytorchjob"):
        assert resolve_kind(cfg, fake).api == expected
        assert (fake.asked == []) is (api != "auto")
        return
    with pytest.raises(KubetrainError, match=expected) as err:
        resolve_kind(cfg, fake)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("api", "elastic", "kind"),
    [("auto", False, "TrainJob"), ("auto", True, "PyTorchJob"), ("pytorchjob", False,
     "PyTorchJob"), ("trainjob", False, "TrainJob")],
    ids=["auto", "auto-elastic", "pytorchjob", "trainjob"],
)  # fmt: skip
def test_offline_auto_is_trainjob_unless_elastic(api, elastic, kind):
    cfg = load_config(
        None, [f"cluster.training_api={api}", f"cluster.elastic={str(elastic).lower()}"]
    )
    assert offline_kind(cfg).resource.kind == kind


# -- the watcher ------------------------------------------------------------------------------


def cond(kind: str, status: str = "True") -> dict:
    return {"type": kind, "status": status, "reason": kind, "message": ""}


@pytest.mark.parametrize(
    ("obj", "suspended"),
    [
        ({"spec": {"suspend": True}}, True),
        ({"spec": {}, "status": {"conditions": [cond("Suspended")]}}, True),
        ({"spec": {"suspend": False}, "status": {"conditions": [cond("Suspended", "False")]}},
         False),
        ({"spec": {}}, False),
    ],
    ids=["spec-suspend", "suspended-condition", "resumed", "never-suspended"],
)  # fmt: skip
def test_a_suspended_trainjob_is_held_in_a_queue(obj, suspended):
    assert TrainJobWatcher(load_config(None, [])).suspended(obj) is suspended


@pytest.mark.parametrize(
    ("labels", "leader"),
    [
        ({"jobset.sigs.k8s.io/replicatedjob-name": "node", "jobset.sigs.k8s.io/job-index": "0",
          "batch.kubernetes.io/job-completion-index": "0"}, True),
        ({"jobset.sigs.k8s.io/replicatedjob-name": "node", "jobset.sigs.k8s.io/job-index": "0",
          "batch.kubernetes.io/job-completion-index": "1"}, False),
        ({"jobset.sigs.k8s.io/replicatedjob-name": "dataset-initializer",
          "batch.kubernetes.io/job-completion-index": "0"}, False),
    ],
    ids=["node-0", "node-1", "initializer"],
)  # fmt: skip
def test_node_0_leads(labels, leader):
    watcher = TrainJobWatcher(load_config(None, []))
    assert watcher.is_leader(labels) is leader
    assert watcher.pod_selector(JOB) == f"jobset.sigs.k8s.io/jobset-name={JOB}"


def test_both_kinds_describe_themselves_for_katib():
    trainjob, pytorchjob = job_kind("trainjob"), job_kind("pytorchjob")
    assert (trainjob.container, pytorchjob.container) == ("node", "pytorch")
    assert trainjob.crd == "trainjobs.trainer.kubeflow.org"
    assert pytorchjob.crd == "pytorchjobs.kubeflow.org"
