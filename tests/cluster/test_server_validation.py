"""Everything kubetrain ships or sends, validated by a real API server (real CRD schemas, Strict
field validation): every kustomize overlay applied server-side for real and as a server dry run,
every object ``kubetrain manifests`` prints for the bundled recipes, and a wrong object refused
with our one-line error.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from cluster.controllers import in_namespace, rendered
from cluster.controlplane import ROOT
from kubetrain.cli import main
from kubetrain.launch.kubeapi import KubeApi, KubeApiError
from kubetrain.pipeline.config import load_config
from tests.conftest import needs_github

pytestmark = pytest.mark.cluster

OVERLAYS = sorted(p.name for p in (ROOT / "manifests" / "overlays").iterdir() if p.is_dir())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_is_accepted_by_the_api_server(control_plane, overlay):
    # Each overlay in a namespace of its own (its PVCs differ, and a claim's spec is immutable).
    ns = f"kubetrain-{overlay}"
    docs = yaml.safe_dump_all(in_namespace(rendered(overlay), ns))
    # --validate=strict: a field the schema does not know is an error, not silently pruned
    applied = control_plane.kubectl(
        "apply", "--server-side", "--validate=strict", "-f", "-", input=docs
    )
    kinds = {line.split("/")[0] for line in applied.stdout.splitlines()}
    assert kinds >= {"namespace", "pytorchjob.kubeflow.org", "role.rbac.authorization.k8s.io"}
    dry = control_plane.kubectl(
        "apply", "--server-side", "--dry-run=server", "--validate=strict", "-f", "-", input=docs
    )
    assert "(server dry run)" in dry.stdout


PLATFORM = sorted(p.name for p in (ROOT / "manifests" / "platform").iterdir() if p.is_dir())


@pytest.mark.parametrize("part", PLATFORM)
def test_platform_installs_are_accepted_by_the_api_server(control_plane, part):
    needs_github(f"manifests/platform/{part} (a remote base; `make kind-e2e` applies it)")
    control_plane.kubectl("create", "namespace", "kubeflow", check=False)
    docs = control_plane.kubectl("kustomize", str(ROOT / "manifests" / "platform" / part)).stdout
    done = control_plane.kubectl(
        "apply", "--server-side", "--dry-run=server", "-f", "-", input=docs
    )
    assert "(server dry run)" in done.stdout


RECIPES = {
    "default": ("default", []),
    "smoke": ("smoke", []),
    "gpu": ("gpu", []),  # GPUs, node selector, tolerations, two nodes
    "vision-gpu": ("vision-gpu", []),  # ResNet-50, 2 x 1 GPU, credentials from a Secret (envFrom)
    # a ResNet-50 FPN detector at 640 px, bf16, 2 x 1 GPU, the search on mAP
    "detection-gpu": ("detection-gpu", []),
    # seq2seq Transformer, FSDP, 2 x 1 GPU; with the search on, so the Experiment is checked too
    "translation-gpu": ("translation-gpu", ["tune.enabled=true"]),
    "elastic": (
        "default",
        ["cluster.elastic=true", "train.nnodes=3", "train.batch_size=66", "cluster.cpu=2"],
    ),
    "pvc-and-account": (
        "default",
        [
            "cluster.pvc_name=team-data",
            "cluster.mount_path=/data",
            "cluster.service_account=trainer",
            "cluster.env={A: b}",
        ],
    ),
}


# What each recipe is rendered with: every training API, queued (Kueue's labels) or not.
APIS = {
    "pytorchjob": ("PyTorchJob", []),
    "trainjob": ("TrainJob", []),
    "trainjob-queued": (
        "TrainJob",
        ["cluster.training_api=trainjob", "cluster.queue_name=gpu-queue",
         "cluster.priority_class=high"],
    ),
    "auto": ("TrainJob", ["cluster.training_api=auto"]),
}  # fmt: skip
CASES = [(case, api) for case in sorted(RECIPES) for api in sorted(APIS)
         if case != "elastic" or api == "pytorchjob"]  # fmt: skip


@pytest.mark.parametrize(("case", "api"), CASES, ids=[f"{c}-{a}" for c, a in CASES])
def test_every_object_kubetrain_manifests_prints_is_accepted(
    control_plane, namespace, capsys, case, api
):
    recipe, settings = RECIPES[case]
    kind, api_settings = APIS[api]
    args = ["manifests", "--set", f"cluster.namespace={namespace}",
            "--set", "cluster.image=registry.example/kubetrain:test",
            "--set", f"cluster.training_api={api.split('-')[0]}"]  # fmt: skip
    for setting in api_settings:
        args += ["--set", setting]
    if recipe != "default":
        args += ["--config", recipe]
    for setting in settings:
        args += ["--set", setting]
    assert main(args) == 0
    printed = capsys.readouterr().out
    docs = list(yaml.safe_load_all(printed))
    assert [d["kind"] for d in docs] == ["Experiment", kind]
    for dry_run in ("--dry-run=server", None):
        flags = [f for f in ("--server-side", dry_run, "--validate=strict") if f]
        done = control_plane.kubectl("apply", *flags, "-f", "-", input=printed)
        assert done.stdout.count("serverside-applied") == 2, done.stdout
    # The Experiment's schema accepts any trial template (Katib checks it in a webhook): the
    # trial's job is checked against its own kind's schema, as Katib would create it.
    trial = copy.deepcopy(docs[0]["spec"]["trialTemplate"]["trialSpec"])
    trial["metadata"] = {**trial.get("metadata", {}), "name": "kubetrain-trial-check"}
    text = yaml.safe_dump(trial).replace("${trialParameters.", "x${")  # a value, not a template
    done = control_plane.kubectl("apply", "--server-side", "--dry-run=server", "--validate=strict",
                                 "-n", namespace, "-f", "-", input=text)  # fmt: skip
    assert "serverside-applied (server dry run)" in done.stdout, done.stdout


def _node_container(job: dict) -> dict:
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return node["template"]["spec"]["template"]["spec"]["containers"][0]


def _master_container(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]


# case -> (training API, what breaks the object, what the one line names)
WRONG = {
    "pytorchjob-replicas-not-a-number": (
        "pytorchjob",
        lambda job: job["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas="two"),
        r"spec.pytorchReplicaSpecs.Master.replicas",
    ),
    "pytorchjob-misspelt-field": (
        "pytorchjob",
        lambda job: job["spec"].update(nprocsPerNode="1"),
        r'unknown field "spec.nprocsPerNode"',
    ),
    "pytorchjob-port-not-a-number": (
        "pytorchjob",
        lambda job: _master_container(job)["ports"][0].update(containerPort="http"),
        r"containerPort",
    ),
    "trainjob-num-nodes-not-a-number": (
        "trainjob",
        lambda job: job["spec"]["trainer"].update(numNodes="two"),
        r"spec.trainer.numNodes",
    ),
    "trainjob-misspelt-field": (
        "trainjob",
        lambda job: job["spec"]["trainer"].update(numProcsPerNode=1),
        r'unknown field "spec.trainer.numProcsPerNode"',
    ),
    # the schema has no place for it: a runtime patch may not set envFrom
    "trainjob-envfrom-in-a-runtime-patch": (
        "trainjob",
        lambda job: _node_container(job).update(envFrom=[{"secretRef": {"name": "s"}}]),
        r"envFrom",
    ),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_a_wrong_object_is_refused_in_one_line(control_plane, namespace, monkeypatch, case):
    from kubetrain.launch.jobkinds import job_kind

    api, mutate, field = WRONG[case]
    kind = job_kind(api)
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    cfg = load_config(None, [f"cluster.namespace={namespace}", "cluster.image=img:1"])
    job = copy.deepcopy(kind.build(cfg, "kubetrain-train-wrong"))
    mutate(job)
    with pytest.raises(KubeApiError, match=rf"the API server rejected {api} ") as err:
        KubeApi(namespace).create(kind.resource, job)
    # 422 from the schema, 400 from strict decoding (unknown fields)
    assert err.value.status in (400, 422) and "\n" not in str(err.value)
    assert f"{namespace}/kubetrain-train-wrong" in str(err.value)
    assert field in str(err.value)
