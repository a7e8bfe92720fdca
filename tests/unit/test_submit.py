"""`kubetrain submit` / `kubetrain schedule` through the real kfp.Client against a fake KFP API
server (tests/fakes/kfp_apiserver.py, the only stand-in)."""

from __future__ import annotations

import pytest

from fakes.kfp_apiserver import FakeKfpApiServer
from kubetrain.cli import main

SETTINGS = ["--set", "cluster.backend=kubernetes", "--set", "cluster.image=reg.example/kt:1"]


@pytest.fixture
def kfp_server(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/kfp/context.json of the user's
    server = FakeKfpApiServer()
    yield server
    server.stop()


def test_submit_compiles_and_creates_a_run_against_fake_kfp_apiserver(kfp_server, capsys):
    rc = main(["submit", "--host", kfp_server.url, "--experiment", "nightly", *SETTINGS])
    assert rc == 0
    assert [e["display_name"] for e in kfp_server.experiments] == ["nightly"]
    (run,) = kfp_server.runs
    assert run["experiment_id"] == kfp_server.experiments[0]["experiment_id"]
    # with a kfp-kubernetes platform spec the client sends both documents
    spec = run["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "kubetrain"
    assert "exec-train" in spec["deploymentSpec"]["executors"]
    # the tune and train steps mount the shared claim on a cluster
    mounts = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]
    assert {k for k, v in mounts["executors"].items() if "pvcMount" in v} == {
        "exec-tune", "exec-train",
    }  # fmt: skip
    assert run["runtime_config"]["parameters"] == {"min_accuracy": 0.9}
    assert f"created run '{run['display_name']}' id {run['run_id']}" in capsys.readouterr().out


def test_submit_reuses_an_existing_experiment_against_fake_kfp_apiserver(kfp_server):
    for _ in range(2):
        assert main(["submit", "--host", kfp_server.url, *SETTINGS]) == 0
    assert len(kfp_server.experiments) == 1 and len(kfp_server.runs) == 2


def test_schedule_replaces_a_recurring_run_of_the_same_name_against_fake_kfp_apiserver(
    kfp_server, capsys
):
    args = ["schedule", "--host", kfp_server.url, "--name", "retrain", *SETTINGS]
    assert main([*args, "--cron", "0 0 3 * * *"]) == 0
    (first,) = kfp_server.recurring
    assert main([*args, "--cron", "0 30 4 * * *"]) == 0
    (second,) = kfp_server.recurring  # exactly one left: the new one
    assert second != first
    rec = kfp_server.recurring[second]
    assert rec["trigger"]["cron_schedule"]["cron"] == "0 30 4 * * *"
    assert rec["mode"] == "ENABLE" and int(rec["max_concurrency"]) == 1 and rec["no_catchup"]
    assert f"(replaced {first})" in capsys.readouterr().out


def test_schedule_rejects_a_five_field_cron_before_contacting_the_server(kfp_server, capsys):
    rc = main(["schedule", "--host", kfp_server.url, "--name", "x", "--cron", "0 3 * * *"])
    assert rc == 1 and kfp_server.requests == []
    assert "six fields, seconds first" in capsys.readouterr().err


def test_server_error_is_one_line_against_fake_kfp_apiserver(kfp_server, capsys):
    kfp_server.fail[("POST", "/apis/v2beta1/runs")] = (403, "user cannot create runs in team-a")
    assert main(["submit", "--host", kfp_server.url, *SETTINGS]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # (kfp.Client logs "Creating experiment" first; the error is the one kubetrain line)
    (line,) = [ln for ln in err if ln.startswith("kubetrain:")]
    assert line == err[-1]
    assert "cannot create the run: HTTP 403: user cannot create runs in team-a" in line


def test_unreachable_kfp_is_one_line(capsys):
    server = FakeKfpApiServer()
    url = server.url
    server.stop()
    assert main(["submit", "--host", url, *SETTINGS]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kubetrain: cannot reach the Kubeflow Pipelines API at {url}: "
                   "[Errno 111] Connection refused"]  # fmt: skip
