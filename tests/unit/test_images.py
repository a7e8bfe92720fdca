"""images/: what no build can show, checked on the Dockerfiles (the base pinned by digest; the
trainer image, which is not built here, never taking the local CPU wheel), and the build's
mirroring of this host's pip settings, which leaves nothing of the host in a layer.

What a built image does (non-root numeric user, unbuffered, labelled, CPU torch and kfp that
import, no pip setting or secret left) is tested on the image itself in the container tier
(tests/integration/test_containers.py).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from kubetrain import __version__
from kubetrain.launch.image import DEFAULT_RUNTIME_IMAGE, runtime_image

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ("runtime", "trainer")


def dockerfile(name: str) -> str:
    return (ROOT / "images" / name / "Dockerfile").read_text()


@pytest.mark.parametrize("name", IMAGES)
def test_base_image_is_a_build_arg_pinned_by_digest(name):
    text = dockerfile(name)
    (default,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"docker\.io/[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", default), default
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f in ("${BASE_IMAGE}", "deps") for f in froms), froms


def _run_installing(text: str, what: str) -> str:
    """The one RUN instruction (continuation lines joined) whose pip install names ``what``."""
    runs = re.findall(r"^RUN (?:.*\\\n)*.*$", text, re.M)
    (run,) = [r for r in runs if re.search(rf"pip install [^\n]*{re.escape(what)}", r)]
    return run


def test_trainer_gets_cuda_torch_never_a_local_cpu_wheel():
    """On a base without torch, pip installs the index's CUDA torch. The local wheels (.whl/,
    the host's find-links) must not be visible then: a ``+cpu`` wheel there satisfies
    ``torch==2.13.*`` as well and would win. Either way the build asserts a CUDA build."""
    text = dockerfile("trainer")
    torch_run = _run_installing(text, '"$TORCH_SPEC"')
    assert "source=.whl" not in torch_run and "--find-links" not in torch_run
    assert "target=/wheels" in torch_run  # an empty tmpfs hides pip.conf's find-links folder
    assert "assert torch.version.cuda" in torch_run
    deps_run = _run_installing(text, "-r /build/requirements.txt")
    assert "assert torch.version.cuda" in deps_run
    assert text.index(torch_run) < text.index(deps_run)  # torch is in place before the rest
    (spec,) = re.findall(r'^ARG TORCH_SPEC="torch==(.+)\.\*"$', text, re.M)
    # The image's torch is one the package admits (pyproject.toml's range).
    (pin,) = re.findall(r'^\s*"torch([<>=!~][^"]*)",$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert SpecifierSet(pin).contains(f"{spec}.0"), (spec, pin)


def test_trainer_is_skipped_not_built_on_a_cpu_base_by_default(tmp_path):
    """``make images`` (IMAGE_BASE=auto) never builds the multi-GB trainer on the debootstrap
    base by itself: without its CUDA base it is skipped with a message naming the opt-in.
    Run for real against a stand-in engine CLI (named so: a fake at the engine's boundary) that
    has no images, cannot pull, and records what it was asked to do."""
    calls = tmp_path / "calls"
    fake = tmp_path / "fake-docker"
    fake.write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\ncase "$1" in buildx|info) exit 0 ;; *) exit 1 ;; esac\n'
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "IMAGE_BASE"}
    env |= {"DOCKER": str(fake), "ENGINE": "docker", "PULL_TIMEOUT": "5"}
    proc = subprocess.run(
        ["bash", str(ROOT / "images" / "build.sh"), "trainer"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "skipping the trainer image" in proc.stderr and "IMAGE_BASE=local" in proc.stderr
    asked = calls.read_text().splitlines()
    assert any(line.startswith("pull ") for line in asked)  # it tried the CUDA base first
    assert not [
        line for line in asked if line.split()[:1] == ["build"] or line.startswith("buildx build")
    ]


def test_components_and_images_agree_on_the_runtime_image(monkeypatch):
    expected = f"ghcr.io/kubetrain/kubetrain-runtime:{__version__}"
    assert expected == DEFAULT_RUNTIME_IMAGE
    build = (ROOT / "images" / "build.sh").read_text()
    assert 'registry="${REGISTRY:-ghcr.io/kubetrain}"' in build
    assert 'image="$registry/kubetrain-$target:$tag"' in build
    monkeypatch.setenv("KUBETRAIN_IMAGE", "registry.example/kubetrain-runtime:1")
    assert runtime_image() == "registry.example/kubetrain-runtime:1"


def test_dockerignore_sends_only_the_package():
    text = (ROOT / ".dockerignore").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # an allow-list: nothing else of the checkout reaches the daemon
    assert {"!src/", "!components/", "!pipelines/", "!pyproject.toml", "!.whl/"} <= set(lines)


@pytest.fixture
def pip_settings():
    spec = importlib.util.spec_from_file_location("pip_settings", ROOT / "images/pip_settings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_pip_settings_are_mirrored_into_secret_files(pip_settings, tmp_path, monkeypatch):
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\n")
    links = tmp_path / "links"
    links.mkdir()
    (links / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl").write_bytes(b"wheel")
    monkeypatch.setattr(
        pip_settings,
        "host_settings",
        lambda: {
            "cert": str(ca),
            "constraint": str(constraints),
            "find-links": str(links),
            "index-url": "https://pypi.example/simple",
            "extra-index-url": "file:///opt/pypi/simple https://more.example/simple",
        },
    )
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    out.mkdir()
    monkeypatch.setattr("sys.argv", ["pip_settings", "--out", str(out), "--wheels", str(wheels)])
    assert pip_settings.main() == 0
    conf = (out / "pip_conf").read_text()
    assert "cert = /run/secrets/pip_cert" in conf
    assert "constraint = /run/secrets/pip_constraint" in conf
    assert "find-links = /wheels" in conf
    assert "index-url = https://pypi.example/simple" in conf
    assert "extra-index-url = https://more.example/simple" in conf  # host file:// paths dropped
    assert "file://" not in conf
    assert (out / "pip_cert").read_text() == ca.read_text()
    assert (wheels / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl").read_bytes() == b"wheel"
