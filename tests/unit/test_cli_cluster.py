"""`kubetrain manifests` and the cluster backend's bad input, through the real CLI entry point.

Only what needs no API server; the answers of a real one (missing namespace, refusals, failed
jobs): tests/cluster.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from kubetrain.cli import main
from kubetrain.pipeline.config import load_config
from kubetrain.pipeline.manifests import cluster_manifests

# cluster.training_api -> (the train job's kind, the comment's first line)
APIS = {
    "auto": ("TrainJob", "# cluster.training_api: auto, rendered offline as TrainJob"),
    "trainjob": ("TrainJob", "# cluster.training_api: trainjob"),
    "pytorchjob": ("PyTorchJob", "# cluster.training_api: pytorchjob"),
}


@pytest.mark.parametrize("api", sorted(APIS))
def test_manifests_prints_every_object_exactly_as_built(capsys, api):
    kind, comment = APIS[api]
    settings = ["cluster.image=registry.example/kubetrain:test", "cluster.namespace=team-a",
                f"cluster.training_api={api}"]  # fmt: skip
    assert main(["manifests", *[arg for s in settings for arg in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert out.startswith(comment)
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["Experiment", kind]
    assert docs[0]["spec"]["trialTemplate"]["trialSpec"]["kind"] == kind
    names = [d["metadata"]["name"] for d in docs]
    assert names[0].startswith("kubetrain-tune-") and names[1].startswith("kubetrain-train-")
    cfg = load_config(None, settings)
    assert docs == cluster_manifests(cfg, train_name=names[1], tune_name=names[0])


def test_manifests_offline_says_which_api_auto_rendered_and_how_to_see_the_other(capsys):
    assert main(["manifests", "--set", "tune.enabled=false", "--set", "cluster.image=i:1"]) == 0
    out = capsys.readouterr().out
    header = " ".join(line[2:] for line in out.split("---")[0].splitlines())
    assert "trainjobs.trainer.kubeflow.org gets a PyTorchJob" in header
    assert "--set cluster.training_api=pytorchjob" in header
    assert [d["kind"] for d in yaml.safe_load_all(out)] == ["TrainJob"]


def test_manifests_with_elastic_on_auto_is_the_pytorchjob(capsys):
    settings = ["tune.enabled=false", "cluster.image=i:1", "cluster.elastic=true"]
    assert main(["manifests", *[arg for s in settings for arg in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "rendered offline as PyTorchJob (cluster.elastic needs it)" in out.replace("\n# ", " ")
    assert [d["kind"] for d in yaml.safe_load_all(out)] == ["PyTorchJob"]


# -- bad input: one line, non-zero exit, nothing left behind -------------------------------


@pytest.fixture
def artifacts(tmp_path) -> dict[str, Path]:
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "meta.json").write_text("{}")
    (dataset / "data.npz").write_text("")
    claim = tmp_path / "claim"
    claim.mkdir()
    return {"dataset": dataset, "claim": claim, "out": tmp_path / "out"}


def run_step(step: str, a: dict[str, Path], *settings: str) -> int:
    args = [step, "--dataset", str(a["dataset"]), "--output", str(a["out"])]
    for s in ("cluster.backend=kubernetes", f"cluster.mount_path={a['claim']}",
              "cluster.namespace=team-a", "cluster.image=registry.example/kubetrain:test",
              *settings):  # fmt: skip
        args += ["--set", s]
    return main(args)


def assert_one_line_and_nothing_left(capsys, a, rc: int, expected: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("kubetrain: ") and expected in err[0], err
    assert not a["out"].exists()
    assert not (a["claim"] / "jobs").exists() or not any((a["claim"] / "jobs").iterdir())


@pytest.mark.parametrize("step", ["train", "tune"])
def test_no_kubeconfig(step, artifacts, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    rc = run_step(step, artifacts)
    assert_one_line_and_nothing_left(capsys, artifacts, rc, "no usable Kubernetes configuration")


@pytest.mark.parametrize("step", ["train", "tune"])
def test_unreachable_cluster(step, artifacts, capsys, monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, f"http://127.0.0.1:{port}")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    rc = run_step(step, artifacts)
    assert_one_line_and_nothing_left(
        capsys, artifacts, rc, f"cannot reach the Kubernetes API at http://127.0.0.1:{port}"
    )


@pytest.mark.parametrize("step", ["train", "tune"])
def test_image_not_set_is_refused_before_contacting_the_cluster(
    step, artifacts, capsys, monkeypatch, tmp_path
):
    monkeypatch.setenv("KUBETRAIN_IMAGE", "")
    with socket.socket() as s:  # contacting it would be "cannot reach", not the image
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, url)))
    args = [step, "--dataset", str(artifacts["dataset"]), "--output", str(artifacts["out"])]
    for s in ("cluster.backend=kubernetes", f"cluster.mount_path={artifacts['claim']}",
              "cluster.namespace=team-a"):  # fmt: skip
        args += ["--set", s]
    rc = main(args)
    assert_one_line_and_nothing_left(capsys, artifacts, rc, "cluster.image is not set")


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (["train.nproc=4", "train.batch_size=64"], "train.nproc (4) is more than the CPU cores"),
        (["cluster.num_gpus=3"], "train.nproc (2) must equal cluster.num_gpus (3)"),
    ],
    ids=["nproc-over-cpu", "nproc-vs-gpus"],
)
def test_processes_the_pods_cannot_serve_are_config_errors(settings, expected, capsys):
    args = ["manifests", "--set", "cluster.image=i:1"]
    for s in settings:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def kubeconfig(tmp_path: Path, server: str) -> Path:
    """A kubeconfig for ``server`` (nothing needs to answer there)."""
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))  # fmt: skip
    return path


def test_empty_image_is_a_config_error(capsys):
    assert main(["manifests", "--set", "cluster.image="]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cluster.image" in err[0]
