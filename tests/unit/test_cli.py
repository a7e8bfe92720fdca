from __future__ import annotations

import json

import pytest
import yaml

from kubetrain.pipeline.config import load_config
from tests.conftest import run_cli


def check_one_line_error(proc, code: int, expected: str) -> None:
    """Exit ``code``; stderr ends in the one ``kubetrain:`` line, which holds ``expected``."""
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kubetrain:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def write_csv(path, rows_per_class: dict[str, int]):
    lines = ["a,b,label"]
    for label, n in rows_per_class.items():
        lines += [f"{i},{i * 2 % 7},{label}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_config_show_prints_the_effective_config():
    proc = run_cli("config", "show", "--set", "train.epochs=3", "--set", "model.name=cnn")
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["train"]["epochs"] == 3 and shown["model"]["name"] == "cnn"
    assert shown["data"]["source"] == "digits"


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["--set", "train.lr=-1"], 2, "config error: train.lr: Input should be greater than 0"),
        (["--set", "train.epochs"], 2, "expected KEY=VALUE"),
        (["--config", "nope.yaml"], 2, "nope.yaml: no such file"),
        (["--set", "data.source=missing.csv"], 1, "data error: missing.csv: no such file"),
        (["--set", "cluster.backend=kubernetes"], 1, "cluster.backend 'kubernetes'"),
        (["--set", "data.task=seq2seq"], 2, "model.name: 'mlp' does not take data.task 'seq2seq'"),
        (["--set", "data.mixup_alpha=0.2"], 2, "data.mixup_alpha: applies to image data only"),
    ],
    ids=[
        "bad-value",
        "bad-set",
        "no-config",
        "no-data",
        "cluster-backend",
        "text-task",
        "mixup",
    ],
)
def test_run_rejects_bad_input_before_writing_anything(tmp_path, args, code, expected):
    out = tmp_path / "run"
    proc = run_cli("run", "--output", str(out), *args)
    check_one_line_error(proc, code, expected)
    assert not out.exists()


@pytest.mark.parametrize(
    ("rows", "args", "code", "expected"),
    [
        ({"x": 3, "y": 3, "z": 3}, [], 1, "cannot split 9 samples"),
        ({"x": 40, "y": 40}, ["--set", "train.batch_size=100"], 2,
         "config error: train.batch_size 100 exceeds the 56 training samples"),
    ],
    ids=["too-few-rows-for-the-split", "batch-larger-than-train-split"],
)  # fmt: skip
def test_run_checks_the_data_against_the_split_before_the_pipeline(
    tmp_path, rows, args, code, expected
):
    data = write_csv(tmp_path / "one.csv", rows)
    out = tmp_path / "run"
    proc = run_cli("run", "--output", str(out), "--set", f"data.source={data}", *args)
    check_one_line_error(proc, code, expected)
    assert not out.exists()  # found before anything was written, the pipeline never started


def test_run_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = run_cli("run", "--output", str(tmp_path))
    check_one_line_error(proc, 1, "not a kubetrain run directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_csv_errors_name_the_column(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("a,b,y\n1,2,x\n3,4,z\n")
    proc = run_cli("preprocess", "--output", str(tmp_path / "ds"), "--set",
                   f"data.source={data}", "--set", "data.label_column=target")  # fmt: skip
    check_one_line_error(proc, 1, "no label column 'target' (columns: a, b, y)")


def test_compile_writes_the_pipeline_ir(tmp_path):
    out = tmp_path / "p.yaml"
    proc = run_cli("compile", "-o", str(out), "--set", "quantize.method=dynamic_int8")
    assert proc.returncode == 0, proc.stderr
    spec = yaml.safe_load(out.read_text())
    assert spec["pipelineInfo"]["name"] == "kubetrain"
    tasks = spec["root"]["dag"]["tasks"]
    for step in ("preprocess", "tune", "train", "quantize", "evaluate", "check-accuracy"):
        assert step in tasks
    assert spec["root"]["inputDefinitions"]["parameters"]["min_accuracy"]["defaultValue"] == 0.9
    # The config slice the quantize task gets carries the override (not the default method).
    assert load_config().quantize.method != "dynamic_int8"
    config_json = tasks["quantize"]["inputs"]["parameters"]["config_json"]["runtimeValue"]
    assert json.loads(config_json["constant"])["quantize"]["method"] == "dynamic_int8"


def test_step_rejects_a_path_that_is_not_an_artifact(tmp_path):
    proc = run_cli("train", "--dataset", str(tmp_path), "--output", str(tmp_path / "m"))
    check_one_line_error(proc, 1, "not a dataset artifact (no meta.json)")


def test_run_reads_a_dated_source_as_the_params_task_does(tmp_path):
    """{date} in data.source is today for a local run, in the preflight as in the params task."""
    from datetime import datetime, timezone

    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    (tmp_path / today).mkdir()
    write_csv(tmp_path / today / "one.csv", {"x": 30})
    proc = run_cli("run", "--output", str(tmp_path / "run"),
                   "--set", f"data.source={tmp_path}/{{date}}/one.csv")  # fmt: skip
    check_one_line_error(proc, 1, f"{today}/one.csv: ")  # the dated file was read
