from __future__ import annotations

import pytest
import yaml

from tests.conftest import run_cli


def check_one_line_error(proc, code: int, expected: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kubetrain:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


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
    ],
    ids=["bad-value", "bad-set", "no-config", "no-data", "cluster-backend"],
)
def test_run_rejects_bad_input_before_writing_anything(tmp_path, args, code, expected):
    out = tmp_path / "run"
    proc = run_cli("run", "--output", str(out), *args)
    check_one_line_error(proc, code, expected)
    assert not out.exists()


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
    assert "dynamic_int8" in out.read_text()  # the config slice reaches the quantize step


def test_each_step_runs_alone_on_artifacts_on_disk(tmp_path):
    ds, model, q, ev = (tmp_path / n for n in ("dataset", "model", "q", "eval"))
    fast = ["--set", "train.nproc=1", "--set", "train.epochs=2"]
    assert run_cli("preprocess", "--output", str(ds)).returncode == 0
    assert (ds / "meta.json").is_file()
    proc = run_cli("train", "--dataset", str(ds), "--output", str(model), *fast)
    assert proc.returncode == 0, proc.stderr
    assert (model / "model.pt").is_file()
    quant = ["--set", "quantize.method=dynamic_int8", "--set", "quantize.max_accuracy_drop=0.05"]
    proc = run_cli("quantize", "--dataset", str(ds), "--model", str(model), "--output", str(q),
                   *quant)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("evaluate", "--dataset", str(ds), "--model", str(model), "--quantized",
                   str(q), "--output", str(ev))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    metrics = yaml.safe_load((ev / "metrics.json").read_text())
    assert metrics["test_accuracy_fp32"] > 0.85
    assert "<img" in (ev / "report.html").read_text()


def test_step_rejects_a_path_that_is_not_an_artifact(tmp_path):
    proc = run_cli("train", "--dataset", str(tmp_path), "--output", str(tmp_path / "m"))
    check_one_line_error(proc, 1, "not a dataset artifact (no meta.json)")
