"""kind end to end: drives scripts/kind-e2e.sh (cluster, platform, images, the training
PyTorchJob, the pipeline submitted with the kfp CLI, promoted model, teardown).

Run it with ``pytest -m e2e`` (or ``make kind-e2e``) where Docker and kind exist and the
platform's images can be pulled; it skips itself, saying what is missing, everywhere else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(7200)]


def _missing() -> str | None:
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: the kind end-to-end test needs docker, kind, kubectl"
    probe = subprocess.run(["docker", "info"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        return "no Docker engine answers (`docker info` failed): kind cannot create a cluster"
    return None


def test_pipeline_on_kind_promotes_the_model():
    reason = _missing()
    if reason:
        pytest.skip(reason)
    venv_bin = str(Path(sys.executable).parent)  # kubetrain and kfp of this environment
    env = dict(os.environ, PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    done = subprocess.run(
        [str(ROOT / "scripts" / "kind-e2e.sh")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    tail = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, tail
    assert "[kind-e2e] FAILED" not in tail
    assert "promoted: yes" in done.stdout
