"""PyTorchJob: the builder (golden YAML, official models) and the client against a fake API server.

The fake Kubernetes API server (tests/fakes/kube_apiserver.py) is the only stand-in: the real
``kubernetes`` client, kubeconfig loading and our launcher talk HTTP to it.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
from kubeflow.training.api_client import ApiClient

from fakes.golden import golden
from fakes.kube_apiserver import condition, pod, running
from kubetrain.config import load_config
from kubetrain.errors import KubetrainError
from kubetrain.launch import get_launcher
from kubetrain.launch.kubeapi import KubeApi
from kubetrain.launch.kubernetes import (
    JobPaths,
    KubernetesLauncher,
    PyTorchJobClient,
    build_pytorchjob,
    should_delete,
)

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


def roundtrip(manifest: dict) -> dict:
    """Through the official kubeflow-training models and back (unknown fields are dropped)."""

    class Response:
        data = json.dumps(manifest)

    client = ApiClient()
    return client.sanitize_for_serialization(
        client.deserialize(Response(), "KubeflowOrgV1PyTorchJob")
    )


# -- builder ------------------------------------------------------------------------------


def test_pytorchjob_matches_golden_yaml():
    cfg = load_config(None, GOLDEN_SETTINGS)
    assert build_pytorchjob(cfg, JOB) == golden("pytorchjob.yaml", build_pytorchjob(cfg, JOB))


def test_pytorchjob_survives_a_roundtrip_through_the_official_models():
    job = build_pytorchjob(load_config(None, GOLDEN_SETTINGS), JOB)
    assert roundtrip(job) == job


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
        assert roundtrip(bad) != bad


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
    assert command[command.index("-m", 3) + 1] == "kubetrain.train.worker"
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


# -- client against the fake API server ----------------------------------------------------


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    with running(tmp_path, monkeypatch) as fake:
        yield fake


def cfg_for(tmp_path: Path, *settings: str):
    claim = tmp_path / "claim"
    claim.mkdir(exist_ok=True)
    return load_config(
        None,
        [
            "cluster.backend=kubernetes",
            "cluster.namespace=team-a",
            "cluster.image=registry.example/kubetrain:test",
            f"cluster.mount_path={claim}",
            "cluster.poll_seconds=0.02",
            "cluster.wait_timeout_seconds=5",
            *settings,
        ],
    )


def submit_and_wait(cfg, lines: list[str] | None = None) -> str:
    client = PyTorchJobClient(cfg)
    name = client.submit(build_pytorchjob(cfg, JOB))
    client.wait(name, emit=(lines.append if lines is not None else lambda _: None))
    return name


def test_job_succeeds_and_master_log_is_streamed_against_fake_apiserver(cluster, tmp_path):
    cluster.statuses["pytorchjobs"] = [
        {"conditions": [condition("Created")]},
        {"conditions": [condition("Running")]},
        {"conditions": [condition("Running")]},
        {"conditions": [condition("Succeeded", "PyTorchJobSucceeded", "done")]},
    ]
    cluster.pods = [[], [pod(f"{JOB}-master-0", job=JOB)]]
    cluster.logs[f"{JOB}-master-0"] = "epoch=1 val_accuracy=0.5\nepoch=2 val_accuracy=0.9\n"
    lines: list[str] = []
    submit_and_wait(cfg_for(tmp_path), lines)
    assert lines == [
        f"[{JOB}-master-0] epoch=1 val_accuracy=0.5",
        f"[{JOB}-master-0] epoch=2 val_accuracy=0.9",
    ]
    assert cluster.created[0]["metadata"]["name"] == JOB
    assert ("POST", "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs") in cluster.requests


@pytest.mark.parametrize(
    ("status", "pods", "expected"),
    [
        pytest.param(
            [{"conditions": [condition("Failed", "PyTorchJobFailed", "Master replica failed")]}],
            [[]],
            r"pytorchjob team-a/kubetrain-train-0a1b2c failed: PyTorchJobFailed: Master replica",
            id="failed-condition",
        ),
        pytest.param(
            [{"conditions": [condition("Running")]}, {"conditions": [condition("Failed", "x")]}],
            [[pod(f"{JOB}-master-0", job=JOB, phase="Failed", terminated="OOMKilled")]],
            r"failed: x \(pod kubetrain-train-0a1b2c-master-0: container pytorch was OOMKilled; "
            r"raise cluster.memory, now 2Gi\)",
            id="oomkilled",
        ),
        pytest.param(
            [{"conditions": [condition("Created")]}],
            [
                [
                    pod(
                        f"{JOB}-master-0",
                        job=JOB,
                        phase="Pending",
                        waiting=("ImagePullBackOff", 'Back-off pulling image "registry.example/k"'),
                    )
                ]
            ],
            r"cannot start: pod kubetrain-train-0a1b2c-master-0: ImagePullBackOff: Back-off",
            id="image-pull-backoff",
        ),
        pytest.param(
            [
                {
                    "conditions": [
                        condition(
                            "Failed",
                            "DeadlineExceeded",
                            "PyTorchJob was active longer than specified deadline",
                        )
                    ]
                }
            ],
            [[]],
            r"longer than specified deadline \(cluster.active_deadline_seconds = 60\)",
            id="deadline",
        ),
    ],
)
def test_job_failure_names_its_reason_against_fake_apiserver(
    cluster, tmp_path, status, pods, expected
):
    cluster.statuses["pytorchjobs"] = status
    cluster.pods = pods
    with pytest.raises(KubetrainError, match=expected) as err:
        submit_and_wait(cfg_for(tmp_path, "cluster.active_deadline_seconds=60"))
    assert "\n" not in str(err.value)


def test_job_that_never_finishes_times_out_against_fake_apiserver(cluster, tmp_path):
    cluster.statuses["pytorchjobs"] = [{"conditions": [condition("Running")]}]
    cluster.pods = [[pod(f"{JOB}-worker-0", "worker", JOB, "Pending", unschedulable="0/3 nodes")]]
    cfg = cfg_for(tmp_path, "cluster.wait_timeout_seconds=1")
    with pytest.raises(KubetrainError, match=r"did not finish within .* = 1 \(pod .* 0/3 nodes\)"):
        submit_and_wait(cfg)


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        pytest.param(
            403,
            'pytorchjobs.kubeflow.org is forbidden: User "tester" cannot create resource',
            r"not allowed to create pytorchjob team-a/kubetrain-train-0a1b2c: pytorchjobs",
            id="403-forbidden",
        ),
        pytest.param(
            422,
            "spec.pytorchReplicaSpecs: Required value",
            r"rejected pytorchjob team-a/kubetrain-train-0a1b2c: spec.pytorchReplicaSpecs",
            id="422-invalid",
        ),
        pytest.param(
            404,
            "the server could not find the requested resource",
            r"no pytorchjobs.kubeflow.org/v1 resource \(is the operator that serves PyTorchJob",
            id="404-no-crd",
        ),
    ],
)
def test_create_errors_are_one_line_against_fake_apiserver(
    cluster, tmp_path, code, message, expected
):
    cluster.fail[("POST", "pytorchjobs")] = (code, message)
    with pytest.raises(KubetrainError, match=expected) as err:
        submit_and_wait(cfg_for(tmp_path))
    assert "\n" not in str(err.value)
    assert cluster.live_objects == []


def test_409_already_exists_is_reported_and_the_other_job_is_kept_against_fake_apiserver(
    cluster, tmp_path
):
    cfg = cfg_for(tmp_path)
    PyTorchJobClient(cfg).submit(build_pytorchjob(cfg, JOB))
    with pytest.raises(KubetrainError, match=r"team-a/kubetrain-train-0a1b2c: it already exists"):
        PyTorchJobClient(cfg).submit(build_pytorchjob(cfg, JOB))
    assert cluster.live_objects == [f"pytorchjobs/{JOB}"]


def test_server_gone_while_waiting_against_fake_apiserver(cluster, tmp_path):
    cluster.statuses["pytorchjobs"] = [{"conditions": [condition("Running")]}]
    cfg = cfg_for(tmp_path, "cluster.wait_timeout_seconds=30")
    client = PyTorchJobClient(cfg)
    name = client.submit(build_pytorchjob(cfg, JOB))
    cluster.stop_after(0.2)
    with pytest.raises(KubetrainError, match=r"cannot reach the Kubernetes API at http://127") as e:
        client.wait(name)
    assert "polls in a row" in str(e.value) and "\n" not in str(e.value)


# -- the launcher: preflight, data through the claim, cleanup ------------------------------


def fake_operator(cluster, tmp_path: Path, outcome: str = "Succeeded"):
    """On create: 'run' the job by writing a model where the job's command says, then finish."""

    def on_create(plural, body):
        cmd = body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
            "command"
        ]
        model = Path(cmd[cmd.index("--output") + 1])
        assert (Path(cmd[cmd.index("--dataset") + 1]) / "meta.json").is_file()
        if outcome == "Succeeded":
            model.mkdir(parents=True)
            (model / "model.json").write_text("{}")
            (model / "metrics.json").write_text('{"world_size": 1}')

    cluster.on_create = on_create
    cluster.statuses["pytorchjobs"] = [{"conditions": [condition(outcome, "Done", "by the fake")]}]


def dataset_dir(tmp_path: Path) -> Path:
    d = tmp_path / "dataset"
    d.mkdir()
    (d / "meta.json").write_text("{}")
    (d / "data.npz").write_text("")
    return d


def test_launcher_moves_data_through_the_claim_and_cleans_up_against_fake_apiserver(
    cluster, tmp_path
):
    fake_operator(cluster, tmp_path)
    cfg = cfg_for(tmp_path)
    assert isinstance(get_launcher(cfg), KubernetesLauncher)
    out = tmp_path / "model-out"
    get_launcher(cfg).run(cfg, dataset_dir(tmp_path), out)
    assert (out / "model.json").is_file()
    assert cluster.live_objects == [] and len(cluster.deleted) == 1
    assert list((tmp_path / "claim" / "jobs").iterdir()) == []


def test_launcher_keeps_a_failed_job_to_inspect_against_fake_apiserver(cluster, tmp_path):
    fake_operator(cluster, tmp_path, outcome="Failed")
    cfg = cfg_for(tmp_path)
    with pytest.raises(KubetrainError, match="failed: Done: by the fake"):
        get_launcher(cfg).run(cfg, dataset_dir(tmp_path), tmp_path / "out")
    assert len(cluster.live_objects) == 1 and cluster.deleted == []
    assert not (tmp_path / "out").exists()


def test_launcher_with_missing_namespace_leaves_nothing_behind_against_fake_apiserver(
    cluster, tmp_path
):
    cfg = cfg_for(tmp_path, "cluster.namespace=nope")
    with pytest.raises(KubetrainError, match=r"namespace 'nope' does not exist on the cluster"):
        get_launcher(cfg).run(cfg, dataset_dir(tmp_path), tmp_path / "out")
    assert cluster.created == [] and not (tmp_path / "claim" / "jobs").exists()


def test_launcher_without_the_claim_mounted_fails_before_contacting_anything(cluster, tmp_path):
    cfg = cfg_for(tmp_path, f"cluster.mount_path={tmp_path / 'not-mounted'}")
    with pytest.raises(KubetrainError, match=r"not-mounted does not exist here: .* mount PVC"):
        get_launcher(cfg).run(cfg, dataset_dir(tmp_path), tmp_path / "out")
    assert cluster.created == []


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
