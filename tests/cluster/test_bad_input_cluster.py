"""The catalogue's cluster answers (tests/unit/test_bad_input.py): what a real kube-apiserver says
to the train and tune steps, through the CLI, as one line with exit 1 and nothing left behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.controllers import IMAGE
from kubetrain.cli import main

pytestmark = pytest.mark.cluster


def step_argv(step: str, tmp: Path, namespace: str) -> list[str]:
    (tmp / "ds").mkdir(exist_ok=True)
    (tmp / "ds" / "meta.json").write_text("{}")
    (tmp / "claim").mkdir(exist_ok=True)
    argv = [step, "--dataset", str(tmp / "ds"), "--output", str(tmp / "out")]
    for setting in ("cluster.backend=kubernetes", f"cluster.namespace={namespace}",
                    f"cluster.image={IMAGE}", f"cluster.mount_path={tmp / 'claim'}",
                    "cluster.poll_seconds=1", "cluster.wait_timeout_seconds=60"):  # fmt: skip
        argv += ["--set", setting]
    return argv


def assert_one_line(capsys, code: int, names: str, tmp: Path) -> None:
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("kubetrain: ") and names in lines[-1], lines[-3:]
    assert not list(tmp.rglob("metrics.json"))
    assert not (tmp / "out").exists()
    assert not (tmp / "claim" / "jobs").exists() or not any((tmp / "claim" / "jobs").iterdir())


@pytest.mark.parametrize("step", ["train", "tune"])
def test_credentials_the_server_rejects_are_one_line(
    step, control_plane, namespace, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig_for("not-a-token", namespace)))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code = main(step_argv(step, tmp_path, namespace))
    assert_one_line(capsys, code, "rejected the credentials", tmp_path)


@pytest.mark.parametrize("step", ["train", "tune"])
def test_a_namespace_our_account_may_not_use_is_one_line(
    step, control_plane, runner, admin, tmp_path, capsys
):
    from kubernetes import client

    # Another namespace: it exists, but the pipeline's account has no Role there.
    other = f"{runner.namespace}-other"
    client.CoreV1Api(admin).create_namespace({"metadata": {"name": other}})
    code = main(step_argv(step, tmp_path, other))
    assert_one_line(capsys, code, other, tmp_path)


@pytest.mark.parametrize("step", ["train", "tune"])
def test_a_namespace_that_does_not_exist_is_one_line(
    step, control_plane, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))  # admin: may read namespaces
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code = main(step_argv(step, tmp_path, "no-such-namespace"))
    assert_one_line(capsys, code, "namespace 'no-such-namespace' does not exist", tmp_path)
