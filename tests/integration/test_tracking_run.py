"""`kubetrain run` with tracking.mlflow_uri: the whole pipeline under kfp.local logs to a real
MLflow server on 127.0.0.1 (SQLite store) through its track task."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.mlflow_server import mlflow_server

pytestmark = pytest.mark.slow


def test_a_local_run_is_tracked_in_mlflow(tmp_path):
    with mlflow_server(tmp_path / "mlflow") as url:
        out = tmp_path / "run"
        proc = run_cli("run", "--config", "smoke", "--output", str(out),
                       "--set", f"tracking.mlflow_uri={url}")  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())

        from mlflow import MlflowClient

        client = MlflowClient(url)
        exp = client.get_experiment_by_name("kubetrain")
        runs = client.search_runs([exp.experiment_id])
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(trials) == metrics["tune_trials"]
        rid = parent.info.run_id
        assert parent.data.metrics["test_accuracy_fp32"] == pytest.approx(
            metrics["test_accuracy_fp32"]
        )
        epochs = [m.step for m in client.get_metric_history(rid, "val_loss")]
        assert epochs == list(range(1, metrics["train_epochs"] + 1))
        assert parent.data.params["train.epochs"] == str(metrics["train_epochs"])
        assert {"report.html", "model"} <= {f.path for f in client.list_artifacts(rid)}
        int8 = {f.path for f in client.list_artifacts(rid, "model/int8")}
        assert "model/int8/quant.json" in int8
        versions = client.search_model_versions("name = 'kubetrain'")
        assert [v.run_id for v in versions] == ([rid] if metrics["promoted"] else [])
