"""Each step run alone through the CLI, on artifacts on disk (real torchrun for train)."""

from __future__ import annotations

import yaml

from tests.conftest import run_cli


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
