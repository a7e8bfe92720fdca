"""What the KFP UI shows of the compiled pipeline: each task's display name, each component
input's description, and output artifacts typed as the UI renders them (Metrics, HTML, ...)."""

from __future__ import annotations

import pytest
import yaml
from kubetrain.pipelines.training import DISPLAY_NAMES

from kubetrain.pipeline.config import PipelineConfig
from kubetrain.pipeline.submit import compile_pipeline

# Outputs the UI visualises, by component and output name.
UI_OUTPUTS = {
    ("comp-evaluate", "metrics"): "system.Metrics",
    ("comp-evaluate", "classification"): "system.ClassificationMetrics",
    ("comp-evaluate", "report"): "system.HTML",
    ("comp-train", "train_metrics"): "system.Metrics",
    ("comp-quantize", "quant_metrics"): "system.Metrics",
    ("comp-tune", "search_metrics"): "system.Metrics",
    ("comp-tune", "search_report"): "system.HTML",
    ("comp-train", "model"): "system.Model",
    ("comp-preprocess", "dataset"): "system.Dataset",
}


def compiled(tmp_path, **sections) -> dict:
    out = tmp_path / "pipeline.yaml"
    compile_pipeline(PipelineConfig(**sections), out)
    return yaml.safe_load(out.read_text())


def executor_tasks(ir: dict):
    """(task key, task) of every task that runs a component, in every DAG."""
    dags = [ir["root"]["dag"]] + [c["dag"] for c in ir["components"].values() if "dag" in c]
    for dag in dags:
        for key, task in dag["tasks"].items():
            if "executorLabel" in ir["components"][task["componentRef"]["name"]]:
                yield key, task


@pytest.mark.parametrize(
    "sections",
    [{}, {"retrain": {"only_if_changed": True, "registry": "/tmp/registry"}}],
    ids=["default", "retrain-only-if-changed"],
)
def test_every_task_has_a_display_name(tmp_path, sections):
    ir = compiled(tmp_path, **sections)
    tasks = dict(executor_tasks(ir))
    expected = {"run-params", "preprocess", "tune", "train", "quantize", "evaluate",
                "check-accuracy", "promote", "reject"}  # fmt: skip
    if sections:
        expected.add("check-changed")
    assert set(tasks) == expected
    for key, task in tasks.items():
        assert task["taskInfo"]["name"] == DISPLAY_NAMES[key], key
        assert task["taskInfo"]["name"] != key  # a name for people, not the task key


def test_every_component_input_is_described(tmp_path):
    ir = compiled(tmp_path, retrain={"only_if_changed": True, "registry": str(tmp_path / "reg")})
    undescribed = [
        (name, kind, key)
        for name, comp in ir["components"].items()
        if "executorLabel" in comp
        for kind in ("parameters", "artifacts")
        for key, spec in comp.get("inputDefinitions", {}).get(kind, {}).items()
        if not spec.get("description", "").strip()
    ]
    assert undescribed == []


def test_outputs_carry_the_artifact_types_the_ui_renders(tmp_path):
    ir = compiled(tmp_path)
    for (comp, output), schema in UI_OUTPUTS.items():
        spec = ir["components"][comp]["outputDefinitions"]["artifacts"][output]
        assert spec["artifactType"]["schemaTitle"] == schema, (comp, output)
