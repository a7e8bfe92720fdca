"""Retrain only when it matters: the model-inputs fingerprint, the registry record, the decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetrain import registry
from kubetrain.core.artifacts import Promotion
from kubetrain.pipeline import steps
from kubetrain.pipeline.config import load_config

BASE = ["retrain.only_if_changed=true"]


def cfg_with(reg: Path, *settings: str):
    return load_config(None, [*BASE, f"retrain.registry={reg}", *settings])


@pytest.mark.parametrize(
    ("setting", "same"),
    [
        ("cluster.backend=kubernetes", True),
        ("cluster.memory=16Gi", True),
        ("retrain.only_if_changed=false", True),
        ("train.lr=0.01", False),
        ("tune.max_trials=3", False),
        ("quantize.method=dynamic_int8", False),
        ("data.val_fraction=0.2", False),
    ],
)
def test_fingerprint_covers_what_shapes_the_model(tmp_path, setting, same):
    a = cfg_with(tmp_path)
    b = cfg_with(tmp_path, setting)
    assert (
        registry.model_inputs_fingerprint(a.model_inputs_json(), "v1")
        == registry.model_inputs_fingerprint(b.model_inputs_json(), "v1")
    ) is same


def test_fingerprint_changes_with_the_data(tmp_path):
    inputs = cfg_with(tmp_path).model_inputs_json()
    fingerprint = registry.model_inputs_fingerprint
    assert fingerprint(inputs, "v1") != fingerprint(inputs, "v2")


def promoted_artifact(tmp_path: Path) -> Path:
    out = tmp_path / "promoted"
    for part in ("fp32", "int8"):
        (out / part).mkdir(parents=True)
        (out / part / "model.pt").write_bytes(b"weights-" + part.encode())
    return out


def test_publish_then_decide(tmp_path):
    reg = tmp_path / "registry"
    cfg = cfg_with(reg)
    assert registry.needs_training(cfg.retrain, cfg.model_inputs_json(), "v1") == (
        True,
        f"no model has been promoted to {reg} yet",
    )
    promotion = Promotion("v1", test_accuracy_fp32=0.95, test_accuracy_int8=0.94, min_accuracy=0.9)
    record = registry.publish(
        str(reg), promoted_artifact(tmp_path), promotion, cfg.model_inputs_json()
    ).to_record()
    fp = registry.model_inputs_fingerprint(cfg.model_inputs_json(), "v1")
    assert record["fingerprint"] == fp and record["model_uri"] == f"{reg}/models/{fp}"
    assert (reg / "models" / fp / "int8" / "model.pt").read_bytes() == b"weights-int8"
    assert json.loads((reg / "promoted.json").read_text()) == record
    assert not list(reg.glob(".*tmp"))
    train, why = registry.needs_training(cfg.retrain, cfg.model_inputs_json(), "v1")
    assert not train and "unchanged" in why
    assert (
        registry.needs_training(cfg.retrain, cfg.model_inputs_json(), "v2")[1]
        == "the data changed (dataset v1 -> v2)"
    )
    other = cfg_with(reg, "train.lr=0.01")
    assert registry.needs_training(other.retrain, other.model_inputs_json(), "v1") == (
        True, "the config changed since the last promoted model",
    )  # fmt: skip


def test_promote_step_publishes_to_the_registry(tmp_path):
    reg = tmp_path / "registry"
    cfg = cfg_with(reg)
    model, quant = tmp_path / "m", tmp_path / "q"
    for d in (model, quant):
        d.mkdir()
        (d / "model.pt").write_bytes(b"x")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"dataset_version": "v9", "metric": "accuracy", "test_accuracy_fp32": 0.95,
                                   "test_accuracy_int8": 0.94, "min_accuracy": 0.9}))  # fmt: skip
    record = steps.promote(model, quant, metrics, tmp_path / "out", cfg=cfg)
    assert record["fingerprint"] == registry.model_inputs_fingerprint(cfg.model_inputs_json(), "v9")
    assert json.loads((tmp_path / "out" / "promotion.json").read_text()) == record
    assert not registry.needs_training(cfg.retrain, cfg.model_inputs_json(), "v9")[0]


def test_only_if_changed_needs_a_registry():
    with pytest.raises(Exception, match=r"only_if_changed needs retrain\.registry"):
        load_config(None, BASE)


def test_fingerprint_ignores_how_a_job_runs_but_not_what_it_computes():
    from kubetrain.registry import model_inputs_fingerprint as fingerprint

    cfg = load_config(None, [])
    same = cfg.with_params({"train.checkpoint_dir": "/elsewhere", "train.nproc": 1,
                            "train.max_restarts": 3})  # fmt: skip
    inputs = cfg.model_inputs_json()
    assert fingerprint(inputs, "v1") == fingerprint(same.model_inputs_json(), "v1")
    lr = cfg.with_params({"train.lr": 0.01}).model_inputs_json()
    assert fingerprint(inputs, "v1") != fingerprint(lr, "v1")
    assert fingerprint(inputs, "v1") != fingerprint(inputs, "v2")
