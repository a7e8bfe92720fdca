"""Object-storage credentials on a cluster: from a Secret (``cluster.storage_secret``: every key
becomes the job pods' environment), never inline in the config that pods and pipelines carry;
and the ``vision-gpu`` recipe that uses them. The same objects against a real API server:
tests/cluster/test_server_validation.py."""

from __future__ import annotations

import json

import pytest
import yaml

import kubetrain
from kubetrain.cli import main
from kubetrain.core.errors import ConfigError
from kubetrain.launch.kubernetes import build_pytorchjob, check_no_inline_credentials
from kubetrain.pipeline.config import load_config
from kubetrain.pipeline.manifests import cluster_manifests
from tests.conftest import pytorchjob_roundtrip

JOB = "kubetrain-train-0a1b2c"
SECRET = "minio-creds"


def containers(job: dict) -> list[dict]:
    return [
        c
        for spec in job["spec"]["pytorchReplicaSpecs"].values()
        for c in spec["template"]["spec"]["containers"]
    ]


def test_every_job_pod_takes_its_credentials_from_the_secret():
    cfg = load_config(
        None,
        ["cluster.image=img:1", "train.nnodes=2", f"cluster.storage_secret={SECRET}",
         "data.storage_options={endpoint_url: 'http://minio:9000'}"],
    )  # fmt: skip
    job = build_pytorchjob(cfg, JOB)
    assert pytorchjob_roundtrip(job) == job  # envFrom is a field of the official models
    found = containers(job)
    assert len(found) == 2  # Master and Worker
    for container in found:
        assert container["envFrom"] == [{"secretRef": {"name": SECRET}}]
        names = {e["name"] for e in container["env"]}
        assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        carried = json.loads(
            next(e["value"] for e in container["env"] if e["name"] == "KUBETRAIN_CONFIG")
        )
        assert carried["data"]["storage_options"] == {"endpoint_url": "http://minio:9000"}


def test_without_a_secret_the_pods_get_no_env_from():
    job = build_pytorchjob(load_config(None, ["cluster.image=img:1"]), JOB)
    assert all("envFrom" not in c for c in containers(job))


def secret_of(job: dict) -> list:
    """How a job's training containers get the Secret: PyTorchJob containers every key
    (``envFrom``); a TrainJob's trainer, which has no envFrom, the storage keys one by one."""
    if job["kind"] == "TrainJob":
        return sorted(
            (e["name"], e["valueFrom"]["secretKeyRef"]["name"])
            for e in job["spec"]["trainer"]["env"]
            if "valueFrom" in e
        )
    (found,) = {json.dumps(c.get("envFrom")) for c in containers(job)}
    return json.loads(found)


def expected_secret(api: str, name: str) -> list:
    if api == "trainjob":
        from kubetrain.launch.trainjob import STORAGE_SECRET_KEYS

        return sorted((key, name) for key in STORAGE_SECRET_KEYS)
    return [{"secretRef": {"name": name}}]


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_search_trials_take_the_secret_too(api):
    cfg = load_config(
        None,
        ["cluster.backend=kubernetes", "cluster.image=img:1", f"cluster.storage_secret={SECRET}",
         f"cluster.training_api={api}"],
    )  # fmt: skip
    experiment, job = cluster_manifests(cfg)
    assert experiment["kind"] == "Experiment"
    trial_job = experiment["spec"]["trialTemplate"]["trialSpec"]
    assert secret_of(trial_job) == secret_of(job) == expected_secret(api, SECRET)


@pytest.mark.parametrize(
    ("settings", "where"),
    [
        (["data.storage_options={key: AKIAEXAMPLE, secret: s3cr3t}"], "data.storage_options.key"),
        (["data.storage_options={secret: s3cr3t}"], "data.storage_options.secret"),
        (["data.storage_options={token: ya29.abc}"], "data.storage_options.token"),
        (["data.storage_options={client_kwargs: {aws_secret_access_key: x}}"],
         "data.storage_options.client_kwargs.aws_secret_access_key"),
        (["data.storage_options={account_key: abc}"], "data.storage_options.account_key"),
        (["cluster.env={AWS_SECRET_ACCESS_KEY: s3cr3t}"], "cluster.env.AWS_SECRET_ACCESS_KEY"),
    ],
    ids=["key", "secret", "token", "nested", "azure-key", "pod-env"],
)  # fmt: skip
def test_inline_credentials_are_refused_in_one_line(settings, where):
    cfg = load_config(None, ["cluster.image=img:1", *settings])
    with pytest.raises(
        ConfigError, match=rf"^config error: {where}: .*cluster\.storage_secret$"
    ) as e:
        build_pytorchjob(cfg, JOB)
    assert "\n" not in str(e.value)
    assert "s3cr3t" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)  # never echoed


@pytest.mark.parametrize(
    "options",
    [
        "{endpoint_url: 'http://minio:9000'}",
        "{anon: true}",
        "{token: anon}",
        "{token: google_default, project: p}",
        "{client_kwargs: {region_name: eu-west-1}}",
        "{key: ''}",
    ],
    ids=["endpoint", "anon", "gcs-anon", "gcs-default", "region", "empty-key"],
)
def test_options_that_hold_no_secret_pass(options):
    check_no_inline_credentials(load_config(None, [f"data.storage_options={options}"]))


def test_kubetrain_manifests_refuses_inline_credentials_with_exit_2(capsys):
    code = main(
        ["manifests", "--config", "vision-gpu", "--set", "data.storage_options={secret: s3cr3t}"]
    )
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "data.storage_options.secret" in err and "s3cr3t" not in err


def test_compiling_a_pipeline_refuses_inline_credentials(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    code = main(["compile", "-o", str(out), "--set", "data.storage_options={token: ya29.abc}"])
    assert code == 2 and not out.exists()
    assert "data.storage_options.token" in capsys.readouterr().err


def test_pipeline_tasks_that_read_data_take_the_secret(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["compile", "-o", str(out), "--set", f"cluster.storage_secret={SECRET}"]) == 0
    _, platform = yaml.safe_load_all(out.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in ("preprocess", "tune", "train", "quantize", "evaluate"):
        refs = executors[f"exec-{step}"]["secretAsEnv"]
        assert {r["secretName"] for r in refs} == {SECRET}
        mapped = {k["envVar"]: r["optional"] for r in refs for k in r["keyToEnv"]}
        assert mapped == {
            "AWS_ACCESS_KEY_ID": False, "AWS_SECRET_ACCESS_KEY": False, "AWS_ENDPOINT_URL": True
        }  # fmt: skip


@pytest.mark.parametrize(
    "name", ["Bad_Name", "-leading", "trailing-", "x" * 254], ids=["case", "lead", "trail", "long"]
)
def test_a_secret_name_kubernetes_would_refuse_is_a_config_error(name):
    with pytest.raises(ConfigError, match=r"cluster\.storage_secret"):
        load_config(None, [f"cluster.storage_secret={name}"])


# -- the vision-gpu recipe ----------------------------------------------------------------------


def test_vision_gpu_recipe_is_the_cluster_run_it_says():
    cfg = load_config("vision-gpu")
    assert cfg.model.name == "torchvision:resnet50"
    assert (cfg.train.precision, cfg.train.nnodes, cfg.train.nproc) == ("bf16", 2, 1)
    assert cfg.cluster.backend == "kubernetes" and cfg.cluster.num_gpus == 1
    assert cfg.cluster.image == f"ghcr.io/kubetrain/kubetrain-trainer:{kubetrain.__version__}"
    assert cfg.data.source.startswith("s3://") and cfg.data.storage_options["endpoint_url"]
    assert cfg.cluster.storage_secret
    check_no_inline_credentials(cfg)


def test_vision_gpu_manifests_are_two_gpu_workers_reading_the_secret(capsys):
    args = ["manifests", "--config", "vision-gpu", "--set", "cluster.training_api=pytorchjob"]
    assert main(args) == 0
    experiment, job = yaml.safe_load_all(capsys.readouterr().out)
    assert pytorchjob_roundtrip(job) == job
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in replicas.items()} == {"Master": 1, "Worker": 1}
    for container in containers(job) + containers(experiment["spec"]["trialTemplate"]["trialSpec"]):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["envFrom"] == [{"secretRef": {"name": "kubetrain-storage"}}]
        assert container["image"].startswith("ghcr.io/kubetrain/kubetrain-trainer:")


def test_vision_gpu_manifests_are_a_trainjob_of_two_gpu_nodes_reading_the_secret(capsys):
    assert main(["manifests", "--config", "vision-gpu"]) == 0  # auto, offline: a TrainJob
    experiment, job = yaml.safe_load_all(capsys.readouterr().out)
    trial = experiment["spec"]["trialTemplate"]["trialSpec"]
    assert (job["spec"]["trainer"]["numNodes"], trial["spec"]["trainer"]["numNodes"]) == (2, 1)
    for trainer in (job["spec"]["trainer"], trial["spec"]["trainer"]):
        assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "1"
        assert trainer["image"].startswith("ghcr.io/kubetrain/kubetrain-trainer:")
    assert secret_of(job) == secret_of(trial) == expected_secret("trainjob", "kubetrain-storage")
