"""PyTorchJob: the builder (golden YAML, official models), the torchrun command, what the
launcher refuses before it talks to anything. The launcher against a real API server: tests/cluster.
"""

from __future__ import annotations

import contextlib
import copy
import json

import pytest

from fakes.golden import golden
from kubetrain.core.errors import ConfigError, KubetrainError
from kubetrain.launch import get_launcher
from kubetrain.launch.cluster import JobPaths, should_delete
from kubetrain.launch.jobkinds import KubernetesLauncher
from kubetrain.launch.kubeapi import KubeApi
from kubetrain.launch.kubernetes import build_pytorchjob
from kubetrain.launch.torchrun import torchrun_command
from kubetrain.pipeline.config import load_config
from tests.conftest import pytorchjob_roundtrip

JOB = "kubetrain-train-0a1b2c"
GOLDEN_SETTINGS = [
    "cluster.backend=kubernetes",
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
    "cluster.active_deadline_seconds=7200",
    "cluster.backoff_limit=2",
]


# -- builder ------------------------------------------------------------------------------


def test_pytorchjob_matches_golden_yaml():
    cfg = load_config(None, GOLDEN_SETTINGS)
    assert build_pytorchjob(cfg, JOB) == golden("pytorchjob.yaml", build_pytorchjob(cfg, JOB))


def test_pytorchjob_survives_a_roundtrip_through_the_official_models():
    job = build_pytorchjob(load_config(None, GOLDEN_SETTINGS), JOB)
    assert pytorchjob_roundtrip(job) == job


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda j: j["spec"].update(nprocsPerNode="1"), id="misspelt-spec-field"),
        pytest.param(
            lambda j: j["spec"]["runPolicy"].update(cleanupPolicy="All"), id="unknown-runpolicy"
        ),
        pytest.param(
            lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][
                0
            ].update(resource={"limits": {}}),
            id="misspelt-container-field",
        ),
        pytest.param(
            lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="two"),
            id="replicas-not-a-number",
        ),
    ],
)
def test_a_wrong_field_does_not_survive_the_official_models(mutate):
    job = build_pytorchjob(load_config(None, GOLDEN_SETTINGS), JOB)
    bad = copy.deepcopy(job)
    mutate(bad)
    # Either the models drop what they do not know, or they reject it outright.
    with contextlib.suppress(ValueError, TypeError):
        assert pytorchjob_roundtrip(bad) != bad


@pytest.mark.parametrize(
    ("nnodes", "elastic", "replicas"),
    [
        pytest.param(1, False, {"Master": 1}, id="one-node"),
        pytest.param(3, False, {"Master": 1, "Worker": 2}, id="three-nodes"),
        pytest.param(2, True, {"Worker": 2}, id="elastic-two-nodes"),
    ],
)
def test_replicas_follow_train_nnodes(nnodes, elastic, replicas):
    cfg = load_config(
        None,
        [
            "cluster.image=img:1",
            f"train.nnodes={nnodes}",
            "train.nproc=2",
            "train.batch_size=96",
            f"cluster.elastic={str(elastic).lower()}",
        ],
    )
    spec = build_pytorchjob(cfg, JOB)["spec"]
    assert {k: v["replicas"] for k, v in spec["pytorchReplicaSpecs"].items()} == replicas
    assert spec["nprocPerNode"] == "2"
    command = spec["pytorchReplicaSpecs"][next(iter(replicas))]["template"]["spec"]["containers"][
        0
    ]["command"]
    assert command[:4] == ["python", "-m", "torch.distributed.run", "--nproc-per-node=2"]
    assert command[command.index("-m", 3) + 1] == "kubetrain.launch.worker"
    if elastic:
        assert spec["elasticPolicy"] == {
            "maxReplicas": nnodes, "maxRestarts": 3, "minReplicas": nnodes,
            "nProcPerNode": 2, "rdzvBackend": "c10d",
        }  # fmt: skip
        assert not any(a.startswith("--master-addr") for a in command)
    else:
        assert "elasticPolicy" not in spec
        assert f"--nnodes={nnodes}" in command and "--node-rank=$(RANK)" in command


def test_the_job_carries_the_config_its_worker_reads():
    cfg = load_config(None, ["cluster.image=img:1", "train.lr=0.02", "model.name=mlp"])
    container = build_pytorchjob(cfg, JOB)["spec"]["pytorchReplicaSpecs"]["Master"]["template"][
        "spec"
    ]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    carried = json.loads(env["KUBETRAIN_CONFIG"])
    assert carried["train"]["lr"] == 0.02 and set(carried) == {"data", "model", "train"}
    paths = JobPaths.for_job(cfg, JOB)
    assert container["command"][-5:] == [
        paths.dataset, "--config-env", "KUBETRAIN_CONFIG", "--output", paths.model,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["cluster.image=''"], "cluster.image"),
        (["cluster.namespace=Team_A"], "cluster.namespace"),
        (["cluster.memory=lots"], "cluster.memory"),
        (["cluster.num_gpus=1"], r"train.nproc \(2\) must equal cluster.num_gpus \(1\)"),
        (["cluster.name_prefix=9lives"], "cluster.name_prefix"),
    ],
    ids=["empty-image", "bad-namespace", "bad-memory", "gpus-vs-nproc", "prefix-digit"],
)
def test_bad_cluster_settings_fail_in_one_line(settings, message):
    with pytest.raises(KubetrainError, match=message) as err:
        load_config(None, settings)
    assert "\n" not in str(err.value)


def test_no_image_anywhere_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("KUBETRAIN_IMAGE", "")
    with pytest.raises(KubetrainError, match=r"cluster\.image is not set"):
        build_pytorchjob(load_config(None, []), JOB)


@pytest.mark.parametrize(
    ("cleanup", "succeeded", "finished", "delete"),
    [
        ("on_success", True, True, True),
        ("on_success", False, True, False),
        ("on_success", False, False, True),
        ("always", False, True, True),
        ("never", True, True, False),
        ("never", False, False, False),
    ],
)
def test_cleanup_rule(cleanup, succeeded, finished, delete):
    assert should_delete(cleanup, succeeded, finished) is delete


# -- what needs no API server (the rest runs against a real one: tests/cluster) ---------------


def test_launcher_without_the_claim_mounted_fails_before_contacting_anything(tmp_path):
    cfg = load_config(
        None,
        ["cluster.backend=kubernetes", "cluster.image=registry.example/kubetrain:test",
         f"cluster.mount_path={tmp_path / 'not-mounted'}"],
    )  # fmt: skip
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    with pytest.raises(KubetrainError, match=r"not-mounted does not exist here: .* mount PVC"):
        KubernetesLauncher(api_factory=_Offline).run(cfg, dataset, tmp_path / "out")


class _Offline:
    """Stands in for the client where no call may be made (the claim check comes first)."""

    def __init__(self, namespace: str):
        self.namespace = namespace

    def __getattr__(self, name):
        raise AssertionError(f"the launcher called the API ({name}) before checking the claim")


def test_no_kubeconfig_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubetrainError, match=r"no usable Kubernetes configuration") as err:
        KubeApi("team-a")
    assert "\n" not in str(err.value) and "KUBECONFIG" in str(err.value)


@pytest.mark.parametrize("elastic", [False, True], ids=["static", "elastic"])
def test_train_max_restarts_maps_to_the_job_restart_policy(elastic):
    cfg = load_config(
        None,
        ["cluster.image=img:1", "train.max_restarts=4", f"cluster.elastic={str(elastic).lower()}"],
    )
    spec = build_pytorchjob(cfg, JOB)["spec"]
    replica = next(iter(spec["pytorchReplicaSpecs"].values()))
    assert spec["runPolicy"]["backoffLimit"] == 4
    assert replica["restartPolicy"] == "OnFailure"  # pods restart; workers resume from checkpoints
    if elastic:
        assert spec["elasticPolicy"]["maxRestarts"] == 4
        command = replica["template"]["spec"]["containers"][0]["command"]
        assert "--max-restarts=4" in command
        # each restart round meets in a fresh store (torch 2.13 keeps the old round's keys)
        env = replica["template"]["spec"]["containers"][0]["env"]
        assert {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"} in env


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["train.nproc=4", "train.batch_size=64"], r"train.nproc \(4\) is more than the CPU cores"),
        (["train.nproc=3", "cluster.cpu=2500m", "train.batch_size=63"], None),
        (
            ["train.nproc=2", "cluster.cpu=500m"],
            r"train.nproc \(2\) is more .*\(cluster.cpu = 500m\)",
        ),
        (["train.nproc=1", "cluster.cpu=100m"], None),
    ],
    ids=["4-on-2-cores", "3-on-2.5-cores", "2-on-half-a-core", "1-on-a-tenth"],
)
def test_processes_are_checked_against_the_pod_cpu(settings, message):
    cfg = load_config(None, ["cluster.image=img:1", *settings])
    if message is None:
        build_pytorchjob(cfg, JOB)
        return
    with pytest.raises(ConfigError, match=message) as err:
        build_pytorchjob(cfg, JOB)
    assert "\n" not in str(err.value) and err.value.exit_code == 2


def test_the_launchers_are_chosen_by_cluster_backend():
    assert isinstance(get_launcher(load_config(None, ["cluster.backend=kubernetes"])),
                      KubernetesLauncher)  # fmt: skip
    assert not isinstance(get_launcher(load_config(None, [])), KubernetesLauncher)


def test_one_torchrun_command_for_every_launcher():
    cmd = torchrun_command(2, ["--nnodes=1"], ["--output", "o"], max_restarts=3, python="py",
                           options=["--monitor-interval=0.2"])  # fmt: skip
    assert cmd == [
        "py", "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
        "--max-restarts=3", "--monitor-interval=0.2", "-m", "kubetrain.launch.worker",
        "--output", "o",
    ]  # fmt: skip
