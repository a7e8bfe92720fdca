"""Experiment tracking (kubetrain.tracking) against a real MLflow server on 127.0.0.1 with a
SQLite store (tests/mlflow_server.py): the track task's own function, as the pipeline runs it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from kubetrain.core.errors import KubetrainError
from kubetrain.pipeline.config import load_config
from tests.mlflow_server import mlflow_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def artifacts(root: Path, promoted: bool = True) -> dict[str, Path]:
    """Evaluate / train / quantize outputs as the steps write them (small files)."""
    ev, model, quant = root / "evaluation", root / "model", root / "quantized"
    for d in (ev, model, quant):
        d.mkdir(parents=True)
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e,
                "val_accuracy": 0.8 + 0.05 * e, "lr": 0.003, "samples_per_second": 9000.0}
               for e in (1, 2, 3)]  # fmt: skip
    trials = [
        {"number": 0, "state": "complete", "value": 0.93, "params": {"train.lr": 0.004},
         "curve": [0.91, 0.93], "seconds": 1.4, "error": None},
        {"number": 1, "state": "pruned", "value": None, "params": {"train.lr": 0.001},
         "curve": [0.52], "seconds": 0.7, "error": None},
    ]  # fmt: skip
    metrics = {"test_accuracy_fp32": 0.9593, "test_accuracy_int8": 0.9574, "promoted": promoted,
               "dataset_version": "fa30d69871e0ce77", "quantize_method": "dynamic_int8",
               "train_rank_cpu_percent": [99.0, 98.0], "min_accuracy": 0.9}  # fmt: skip
    details = {"history": history, "trials": trials,
               "tuning": {"enabled": True, "metric": "val_accuracy"}}  # fmt: skip
    (ev / "metrics.json").write_text(json.dumps(metrics))
    (ev / "details.json").write_text(json.dumps(details))
    (ev / "report.html").write_text("<html><body>report</body></html>")
    (model / "model.pt").write_bytes(b"fp32 weights")
    (model / "model.json").write_text("{}")
    (quant / "model.pt2").write_bytes(b"int8 program")
    return {"evaluation": ev, "model": model, "quantized": quant}


def _client(url):
    from mlflow import MlflowClient

    return MlflowClient(url)


@pytest.mark.parametrize("promoted", [True, False], ids=["promoted", "rejected"])
def test_track_task_logs_the_run_to_a_real_mlflow_server(server, tmp_path, promoted):
    """The track component's own function, as the pipeline runs it, against the server."""
    from kubetrain import components as c

    art = artifacts(tmp_path, promoted)
    name = f"kubetrain-job-{promoted}"
    cfg = load_config(overrides=[f"tracking.mlflow_uri={server}", "train.epochs=3",
                                 f"tracking.registered_model=digits-{promoted}"])  # fmt: skip
    url = c.track.python_func(
        config_json=cfg.sections_json(*type(cfg).model_fields), overrides='{"train.lr": 0.004}',
        run_name=name, promoted=promoted,
        **{k: SimpleNamespace(path=str(v)) for k, v in art.items()},
    )  # fmt: skip
    assert url.startswith(f"{server}/#/experiments/")
    client = _client(server)
    exp = client.get_experiment_by_name("kubetrain")
    runs = client.search_runs([exp.experiment_id], filter_string=f"run_name = '{name}'")
    (run,) = runs
    rid = run.info.run_id
    assert url.endswith(rid) and run.info.status == "FINISHED"
    # the effective config as params (the run-time override applied), tracking itself left out
    assert run.data.params["train.epochs"] == "3" and run.data.params["train.lr"] == "0.004"
    assert run.data.params["model.hidden_sizes"] == "[256, 128]"
    assert not any(k.startswith("tracking.") for k in run.data.params)
    assert run.data.metrics["test_accuracy_fp32"] == pytest.approx(0.9593)
    assert run.data.metrics["promoted"] == float(promoted)
    history = client.get_metric_history(rid, "val_accuracy")
    assert [(m.step, round(m.value, 2)) for m in history] == [(1, 0.85), (2, 0.9), (3, 0.95)]
    assert [m.step for m in client.get_metric_history(rid, "train_loss")] == [1, 2, 3]
    # trials as nested runs
    trials = client.search_runs([exp.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{rid}'")  # fmt: skip
    by_name = {t.info.run_name: t for t in trials}
    assert set(by_name) == {"trial 0", "trial 1"}
    assert by_name["trial 0"].data.params == {"train.lr": "0.004"}
    assert by_name["trial 1"].info.status == "KILLED"  # pruned
    curve = client.get_metric_history(by_name["trial 0"].info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in curve] == [(1, 0.91), (2, 0.93)]
    # report, fp32 and int8 models as artifacts
    top = {f.path for f in client.list_artifacts(rid)}
    assert {"report.html", "metrics.json", "model"} <= top
    assert {f.path for f in client.list_artifacts(rid, "model/int8")} == {"model/int8/model.pt2"}
    assert "model/fp32/model.pt" in {f.path for f in client.list_artifacts(rid, "model/fp32")}
    # a promoted model is registered, a rejected one is not
    versions = client.search_model_versions(f"name = 'digits-{promoted}'")
    if promoted:
        (version,) = versions
        assert version.run_id == rid and version.source == f"runs:/{rid}/model"
        assert version.tags["test_accuracy_int8"] == "0.9574"
    else:
        assert versions == []


def test_a_second_promotion_is_the_next_model_version(server, tmp_path):
    from kubetrain.tracking.log import collect, log_run

    cfg = load_config(overrides=[f"tracking.mlflow_uri={server}",
                                 "tracking.registered_model=digits-again"])  # fmt: skip
    versions = []
    for i in range(2):
        art = artifacts(tmp_path / str(i))
        run = collect(f"r{i}", {}, art["evaluation"], art["model"], art["quantized"], True)
        versions.append(log_run(cfg.tracking, run).model_version)
    assert versions == ["1", "2"]


def test_an_unreachable_server_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[tracking]')")
    from kubetrain.tracking.log import collect, log_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from tests.mlflow_server import _free_port

    uri = f"http://127.0.0.1:{_free_port()}"
    cfg = load_config(overrides=[f"tracking.mlflow_uri={uri}"])
    art = artifacts(tmp_path)
    run = collect("r", {}, art["evaluation"], art["model"], art["quantized"], True)
    with pytest.raises(KubetrainError) as err:
        log_run(cfg.tracking, run)
    assert str(err.value).startswith(f"tracking: cannot log to MLflow at {uri}: ")
    assert "\n" not in str(err.value)
    assert str(err.value).endswith(": connection refused")
