"""The plain `kfp` CLI (a real subprocess, the real kfp.Client) against the fake KFP API server
(tests/fakes/kfp_apiserver.py): a run created with run-time overrides on kubetrain's IR."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from kubetrain.cli import main
from tests.unit.test_submit import kfp_server  # noqa: F401 (a fixture)


def test_kfp_cli_run_create_with_overrides_against_fake_kfp_apiserver(kfp_server, tmp_path):  # noqa: F811
    """`kfp run create ... overrides='{...}'` on the IR of `kubetrain compile`; the values the
    server receives drive the params task as the backend would run it."""
    from kubetrain import components as c
    from kubetrain.pipeline.params import STEP_SECTIONS

    package = tmp_path / "kubetrain.yaml"
    assert main(["compile", "-o", str(package)]) == 0
    kfp_cli = Path(sys.executable).with_name("kfp")
    proc = subprocess.run(
        [str(kfp_cli), "--endpoint", kfp_server.url, "run", "create", "-e", "nightly",
         "-f", str(package), 'overrides={"data.source": "s3://bucket/2026-11-30/"}',
         "tune_max_trials=3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (run,) = kfp_server.runs
    sent = run["runtime_config"]["parameters"]
    assert sent == {"overrides": {"data.source": "s3://bucket/2026-11-30/"}, "tune_max_trials": 3}
    # the params task of the IR the server got, run on those values
    spec = run["pipeline_spec"]
    task = spec["root"]["dag"]["tasks"]["run-params"]["inputs"]["parameters"]
    defaults = {k: v.get("defaultValue") for k, v in
                spec["root"]["inputDefinitions"]["parameters"].items()}  # fmt: skip
    values = {**defaults, **sent}
    out = c.run_params.python_func(
        config_json=task["config_json"]["runtimeValue"]["constant"],
        overrides=values["overrides"], data_source=values["data_source"],
        train_epochs=int(values["train_epochs"]), tune_max_trials=int(values["tune_max_trials"]),
        schedule_time="2026-11-30T03:00:00Z",
    )  # fmt: skip
    by_step = {k: json.loads(v) for k, v in zip(STEP_SECTIONS, out, strict=True)}
    assert by_step["preprocess"] == {"data.source": "s3://bucket/2026-11-30/"}
    assert by_step["tune"] == {"data.source": "s3://bucket/2026-11-30/", "tune.max_trials": 3}
    assert by_step["quantize"] == {}
    assert yaml.safe_load(package.read_text())["pipelineInfo"]["name"] == "kubetrain"
