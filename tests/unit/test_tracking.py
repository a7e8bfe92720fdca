"""Experiment tracking (kubetrain.tracking): the config section and the track task in the
compiled pipeline. Against a real MLflow server: tests/integration/test_tracking.py."""

from __future__ import annotations

import sys

import pytest
import yaml

from kubetrain.cli import main
from kubetrain.core.errors import ConfigError
from kubetrain.pipeline.config import load_config


def test_mlflow_uri_without_mlflow_installed_is_a_one_line_config_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # how Python marks a module absent
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["tracking.mlflow_uri=http://127.0.0.1:5000"])
    assert str(err.value) == (
        "config error: tracking.mlflow_uri: mlflow is not installed: pip install "
        "'kubetrain[tracking]', or unset it (got 'http://127.0.0.1:5000')"
    )
    assert main(["config", "show", "--set", "tracking.mlflow_uri=http://h:5000"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    load_config()  # unset: nothing asks for mlflow


def _compile(tmp_path, *sets) -> dict:
    out = tmp_path / "p.yaml"
    assert main(["compile", "-o", str(out), *[x for s in sets for x in ("--set", s)]]) == 0
    return yaml.safe_load(out.read_text())


def test_without_a_tracking_uri_the_pipeline_has_no_track_task(tmp_path):
    spec = _compile(tmp_path)
    assert "comp-track" not in spec["components"]
    assert "track" not in spec["root"]["dag"]["tasks"]


def test_with_a_tracking_uri_a_track_task_follows_the_gate(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[tracking]')")
    spec = _compile(tmp_path, "tracking.mlflow_uri=http://127.0.0.1:5000")
    task = spec["root"]["dag"]["tasks"]["track"]
    assert task["cachingOptions"].get("enableCache", False) is False
    inputs = task["inputs"]
    assert inputs["parameters"]["promoted"]["taskOutputParameter"]["producerTask"] == (
        "check-accuracy"
    )
    assert inputs["parameters"]["run_name"]["runtimeValue"]["constant"] == "{{$.pipeline_job_name}}"
    assert {k: v["taskOutputArtifact"]["producerTask"] for k, v in inputs["artifacts"].items()} == {
        "evaluation": "evaluate", "model": "train", "quantized": "quantize",
    }  # fmt: skip
