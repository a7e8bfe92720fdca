"""`kubetrain submit` / `kubetrain schedule` through the real kfp.Client against a fake KFP API
server (tests/fakes/kfp_apiserver.py, the only stand-in)."""

from __future__ import annotations

import json

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
    # cluster.backend shapes the pipeline (compiled in); cluster.image is a run-time override
    assert run["runtime_config"]["parameters"] == {
        "min_accuracy": 0.9, "overrides": {"cluster.image": "reg.example/kt:1"},
    }  # fmt: skip
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


def test_submit_sends_set_items_as_run_time_parameters_against_fake_kfp_apiserver(kfp_server):
    sets = ["--set", "data.source=s3://bucket/{date}/", "--set", "train.epochs=3",
            "--set", "train.lr=0.01", "--set", "evaluate.min_accuracy=0.8"]  # fmt: skip
    assert main(["submit", "--host", kfp_server.url, *SETTINGS, *sets]) == 0
    (run,) = kfp_server.runs
    assert run["runtime_config"]["parameters"] == {
        "min_accuracy": 0.8, "data_source": "s3://bucket/{date}/", "train_epochs": 3,
        "overrides": {"cluster.image": "reg.example/kt:1", "train.lr": 0.01},
    }  # fmt: skip
    # not baked in: the compiled pipeline is the one of the config file, the run says the rest
    spec = json.dumps(run["pipeline_spec"]["pipeline_spec"])
    assert "s3://bucket" not in spec and '\\"source\\": \\"digits\\"' in spec
    assert "{{$.pipeline_job_schedule_time_utc}}" in spec
    assert run["display_name"] == "kubetrain mlp s3://bucket/{date}/"


def test_schedule_takes_a_dated_source_against_fake_kfp_apiserver(kfp_server):
    args = ["schedule", "--host", kfp_server.url, "--name", "nightly", "--cron", "0 0 3 * * *"]
    assert main([*args, *SETTINGS, "--set", "data.source=s3://bucket/{date}/"]) == 0
    (rec,) = kfp_server.recurring.values()
    assert rec["runtime_config"]["parameters"]["data_source"] == "s3://bucket/{date}/"


def test_a_bad_set_fails_before_contacting_the_server(kfp_server, capsys):
    assert main(["submit", "--host", kfp_server.url, "--set", "train.epochs=0"]) == 2
    assert kfp_server.requests == []
    assert capsys.readouterr().err.strip() == (
        "kubetrain: config error: train.epochs: Input should be greater than or equal to 1 (got 0)"
    )
