"""retrain.only_if_changed under the real KFP local runner: the second run trains nothing."""

from __future__ import annotations

import pytest

from kubetrain.pipeline.config import load_config
from kubetrain.pipeline.run import run_local


@pytest.mark.slow
def test_second_scheduled_run_with_unchanged_inputs_skips_training(tmp_path):
    settings = [
        "retrain.only_if_changed=true",
        f"retrain.registry={tmp_path / 'registry'}",
        "tune.enabled=false",
        "train.epochs=2",
        "train.nproc=1",
        "model.hidden_sizes=[32]",
        "evaluate.min_accuracy=0.5",
        "evaluate.latency_repeats=3",
    ]
    cfg = load_config(None, settings)
    first = run_local(cfg, tmp_path / "run1", cache=False)
    assert first.retrained and first.metrics["promoted"]
    assert (tmp_path / "registry" / "promoted.json").is_file()
    second = run_local(cfg, tmp_path / "run2", cache=False)
    assert not second.retrained and second.metrics == {}
    assert not list((tmp_path / "run2" / "kfp").glob("*/train"))  # train never ran
    third = run_local(load_config(None, [*settings, "train.epochs=3"]), tmp_path / "run3",
                      cache=False)  # fmt: skip
    assert third.retrained
