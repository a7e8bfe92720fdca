"""The suite's own harness, without a control plane: a CI run cannot pass with the suite skipped,
and the audit log is read safely while the server writes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cluster.controlplane import ROOT, ControlPlane

pytestmark = pytest.mark.cluster

# One test that needs the control plane; the gate decides before it runs.
NEEDS_A_CONTROL_PLANE = "tests/cluster/test_rbac.py::test_the_accounts_rules_are_the_role"


@pytest.mark.parametrize(
    "ci, rc, says",
    [("", 0, "SKIPPED"), ("true", 1, "CI must provide the cluster suite's control plane")],
    ids=["skips-on-a-developer-machine", "fails-in-ci"],
)
def test_a_missing_control_plane_skips_only_outside_ci(tmp_path, ci, rc, says):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["KUBETRAIN_K8S_DIR"] = str(tmp_path / "no-k8s")  # nothing there: missing() says why
    if ci:
        env["CI"] = ci
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cluster", "-p", "no:cacheprovider", "-q",
         NEEDS_A_CONTROL_PLANE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == rc, out
    assert says in out and "no kube-apiserver at" in out, out


def test_the_audit_log_skips_a_last_line_still_being_written(tmp_path):
    plane = ControlPlane(tmp_path)
    event = {"verb": "create", "user": {"username": "u"}}
    plane.audit_log.write_text(json.dumps(event) + "\n" + '{"verb": "li')
    assert plane.audit(username="u") == [event]
    plane.audit_log.write_text('{"verb": "li\n' + json.dumps(event) + "\n")
    with pytest.raises(json.JSONDecodeError):  # only the last line may be partial
        plane.audit(username="u")
