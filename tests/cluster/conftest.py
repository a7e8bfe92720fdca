"""Fixtures of the cluster suite: a real API server (one per session), fresh namespaces, the
pipeline's ServiceAccount with a real token, and the test in the controllers' place.

Every test module here is marked ``cluster`` (``pytestmark``). Where a part of the control plane
is absent (``../shared/k8s``, etcd, kubectl, openssl) the suite skips with one reason, and fails
with it when ``CI`` is set: a CI run never passes with the suite silently skipped (``.ci/run``
installs the rest before ``make test-cluster``).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.controllers import RUNNER_SA, Operator, Runner, in_namespace, rendered
from cluster.controlplane import ControlPlane, missing

TIMINGS: dict[str, float] = {}


def pytest_configure(config):
    # The API server's certificate is self-signed (as in envtest); the clients skip verification.
    config.addinivalue_line("filterwarnings", "ignore::urllib3.exceptions.InsecureRequestWarning")


def pytest_terminal_summary(terminalreporter):
    if "start" in TIMINGS:
        terminalreporter.write_line(
            f"cluster suite: control plane (etcd + kube-apiserver + CRDs) ready in "
            f"{TIMINGS['start']:.1f} s"
        )


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + CRDs on free loopback ports, for the whole session."""
    why = missing()
    if why and os.environ.get("CI"):
        pytest.fail(f"CI must provide the cluster suite's control plane (.ci/run): {why}")
    if why:
        pytest.skip(why)
    started = time.monotonic()
    plane = ControlPlane(tmp_path_factory.mktemp("envtest"))
    try:
        plane.start()
        TIMINGS["start"] = time.monotonic() - started
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """A dataset artifact's files; the tests that do not run the job's command never read it."""
    d = tmp_path / "dataset"
    d.mkdir()
    (d / "meta.json").write_text("{}")
    return d


@pytest.fixture
def admin(control_plane) -> Any:
    return control_plane.admin_client()


@pytest.fixture
def namespace(control_plane, admin) -> str:
    """A fresh namespace with a ``default`` ServiceAccount (no controller makes one here)."""
    from kubernetes import client

    name = f"t-{secrets.token_hex(4)}"
    core = client.CoreV1Api(admin)
    core.create_namespace({"metadata": {"name": name}})
    core.create_namespaced_service_account(name, {"metadata": {"name": "default"}})
    return name


@pytest.fixture
def runner(control_plane, admin, namespace, monkeypatch) -> Runner:
    """Our ServiceAccount, Role and RoleBinding applied in ``namespace``; a TokenRequest for the
    account; ``KUBECONFIG`` pointing at it: the launchers run as the pipeline would."""
    from kubernetes import client

    rbac = [d for d in rendered() if d["kind"] in ("ServiceAccount", "Role", "RoleBinding")]
    control_plane.kubectl(
        "apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(in_namespace(rbac, namespace))
    )
    answer = client.CoreV1Api(admin).create_namespaced_service_account_token(
        RUNNER_SA, namespace, {"spec": {"expirationSeconds": 3600}}
    )
    token = answer.status.token
    kubeconfig = control_plane.kubeconfig_for(token, namespace)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return Runner(namespace, token, kubeconfig)


@pytest.fixture
def operator(admin, namespace) -> Operator:
    return Operator(admin, namespace)
