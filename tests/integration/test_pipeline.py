"""The whole pipeline under kfp.local (real SubprocessRunner tasks, real torchrun workers)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # the whole pipeline, twice

SMALL = [
    "--set", "tune.max_trials=4", "--set", "tune.trial_epochs=3",
    "--set", "train.epochs=10", "--set", "train.nproc=2",
    "--set", "evaluate.latency_repeats=10",
]  # fmt: skip
REQUIRED = (
    "test_accuracy_fp32",
    "test_accuracy_int8",
    "model_size_bytes_fp32",
    "model_size_bytes_int8",
    "train_samples_per_second",
    "promoted",
)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    proc = run_cli("run", "--output", str(out), *SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_run_trains_a_good_model_and_reports_it(first_run):
    out, proc = first_run
    metrics = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED:
        assert key in metrics
    assert metrics["test_accuracy_fp32"] >= 0.9
    assert abs(metrics["test_accuracy_fp32"] - metrics["test_accuracy_int8"]) <= 0.01
    assert metrics["model_size_bytes_int8"] < 0.35 * metrics["model_size_bytes_fp32"]
    assert metrics["train_world_size"] == 2 and metrics["train_ranks_identical"] is True
    assert metrics["tune_trials"] == 4
    assert metrics["promoted"] is True
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 4  # curves, trials, fp32/int8, confusion
    assert "http://" not in report and "https://" not in report  # self-contained
    for line in ("run directory:", "test accuracy fp32:", "test accuracy int8:", "report:"):
        assert line in proc.stdout
    assert str(out / "report.html") in proc.stdout


def test_promoted_artifacts_reload_in_a_fresh_process(first_run):
    out, _ = first_run
    promoted = sorted(out.glob("kfp/*/promote/promoted"))
    assert len(promoted) == 1
    dataset = next(out.glob("kfp/*/preprocess/dataset"))
    code = (
        "import sys; from kubetrain.data import load_dataset;"
        "from kubetrain.quantize import load_model, load_quantized;"
        "from kubetrain.tasks.measure import predict;"
        "d = load_dataset(sys.argv[2]); x, y = d.split('test');"
        "acc = lambda m: (predict(m, x, d.input_shape) == y).mean();"
        "print(acc(load_model(sys.argv[1] + '/fp32')), acc(load_quantized(sys.argv[1] + '/int8')))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(promoted[0]), str(dataset)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    fp32, int8 = map(float, proc.stdout.split())
    metrics = json.loads((out / "metrics.json").read_text())
    assert fp32 == pytest.approx(metrics["test_accuracy_fp32"])
    assert int8 == pytest.approx(metrics["test_accuracy_int8"])


def test_rerun_takes_finished_steps_from_cache_and_the_gate_can_reject(first_run):
    out, _ = first_run
    before = json.loads((out / "metrics.json").read_text())
    assert before["test_accuracy_fp32"] < 0.9999  # else this bar cannot reject
    proc = run_cli("run", "--output", str(out), *SMALL, "--set", "evaluate.min_accuracy=0.9999")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for task in ("preprocess", "tune", "train", "quantize"):
        assert f"{task:<15} cached" in proc.stdout.splitlines()
    after = json.loads((out / "metrics.json").read_text())
    assert after["promoted"] is False and "promoted:           no" in proc.stdout
    assert after["train_seconds"] == before["train_seconds"]  # the same, cached, model
    decisions = list(out.glob("kfp/*/reject/decision/decision.json"))
    assert len(decisions) == 1
    assert "below the bar 0.9999" in json.loads(decisions[0].read_text())["reason"]
    assert len(list(out.glob("kfp/*/promote/promoted"))) == 1  # only the first run promoted
