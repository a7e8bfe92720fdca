"""The compiled IR with run-time parameters, run as a KFP backend would: the scheduled-time
placeholder resolved to a fixed time (as KFP's driver does), the run's parameters given, every
task a real kfp.local subprocess. Then a second run that changes one step's override."""

from __future__ import annotations

import json

import pytest

from kubetrain.cli import main
from kubetrain.pipeline.params import SCHEDULE_PLACEHOLDER

pytestmark = pytest.mark.slow

FAST = ["--config", "smoke", "--set", "tune.enabled=false", "--set", "train.nproc=1",
        "--set", "quantize.method=dynamic_int8", "--set", "evaluate.latency_repeats=3"]  # fmt: skip


def _digits_csv(path):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    path.parent.mkdir(parents=True)
    rows = [",".join(f"p{i}" for i in range(64)) + ",label"]
    rows += [",".join(str(int(v)) for v in xi) + f",{yi}" for xi, yi in zip(x, y, strict=True)]
    path.write_text("\n".join(rows) + "\n")


def _run(pipeline, root, **params) -> set[str]:
    """Run under kfp.local with caching; the tasks that ran (a cached task writes nothing)."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               enable_caching=True, cache_root=str(root / ".cache"))  # fmt: skip
    before = set(root.glob("kubetrain-*"))
    pipeline(**params)
    (run_dir,) = set(root.glob("kubetrain-*")) - before
    return {p.name for p in run_dir.iterdir() if (p / "executor_output.json").is_file()}


def test_compiled_pipeline_takes_dated_data_and_overrides_at_run_time(tmp_path):
    from kfp import components

    _digits_csv(tmp_path / "data" / "2026-11-30" / "digits.csv")
    package = tmp_path / "kubetrain.yaml"
    assert main(["compile", "-o", str(package), *FAST]) == 0
    text = package.read_text()
    assert text.count(SCHEDULE_PLACEHOLDER) == 1
    package.write_text(text.replace(SCHEDULE_PLACEHOLDER, "2026-11-30T03:00:00Z"))
    pipeline = components.load_component_from_file(str(package))
    root = tmp_path / "root"
    overrides = {"data.source": str(tmp_path / "data" / "{date}" / "digits.csv"),
                 "model.hidden_sizes": [32]}  # fmt: skip

    first = _run(pipeline, root, overrides=overrides, train_epochs=2)
    assert {"preprocess", "tune", "train", "quantize", "evaluate"} <= first
    (meta,) = root.glob("*/preprocess/dataset/meta.json")
    assert json.loads(meta.read_text())["source"] == str(
        tmp_path / "data" / "2026-11-30" / "digits.csv"
    )
    (history,) = root.glob("*/train/model/history.json")
    assert [h["epoch"] for h in json.loads(history.read_text())] == [1, 2]
    (model,) = root.glob("*/train/model/model.json")
    assert json.loads(model.read_text())["config"]["hidden_sizes"] == [32]

    # An override of the quantize section re-runs quantize and what follows it, nothing before.
    again = {**overrides, "quantize.calibration_samples": 128}
    second = _run(pipeline, root, overrides=again, train_epochs=2)
    assert {"quantize", "evaluate"} <= second
    assert not {"preprocess", "tune", "train"} & second
