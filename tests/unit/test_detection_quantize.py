"""int8 for a detector: the Linear-layer methods on Faster R-CNN's heads and PT2E static on its
backbone, each saved, reloaded from its files and measured for mAP and latency; the gate in mAP
points keeps fp32 (with the numbers) or fails when no method holds; what does not apply is said
in one line."""

from __future__ import annotations

import pytest

pytest.importorskip("torchvision", reason="detection needs the vision extra")
pytest.importorskip("pycocotools", reason="detection's mAP needs the vision extra")

import torch
from torch import nn

from detection_data import coco_folder
from kubetrain.core.artifacts import DatasetArtifact, QuantizedModel
from kubetrain.core.distributed import DistContext
from kubetrain.core.errors import ConfigError, KubetrainError
from kubetrain.data.config import DataConfig
from kubetrain.pipeline.config import PipelineConfig
from kubetrain.quantize import detection as qdet
from kubetrain.quantize.config import QuantizeConfig
from kubetrain.quantize.driver import load_quantized, quantize_artifact
from kubetrain.tasks import build_dataset, open_task, task_for_model

pytestmark = pytest.mark.vision


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from kubetrain.train.loop import fit, save_model

    root = tmp_path_factory.mktemp("coco")
    coco_folder(root, count=40)
    ds = tmp_path_factory.mktemp("dataset")
    build_dataset(DataConfig(source=str(root), task="detection", shard_samples=8), ds)
    cfg = PipelineConfig.model_validate({
        "data": {"source": str(root), "task": "detection"},
        "model": {"name": "detection_factory:tiny_detector"},
        "train": {"epochs": 3, "batch_size": 4, "lr": 0.003, "optimizer": "adamw", "nproc": 1},
    })  # fmt: skip
    data = DatasetArtifact.load(ds)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    task = open_task(cfg, data)
    save_model(fit(cfg, task, DistContext()), cfg, task, out)
    return ds, out


def _quantize(model_dir, tmp_path, **kw):
    ds, model = model_dir
    qcfg = QuantizeConfig(latency_repeats=3, calibration_samples=8, **kw)
    info = quantize_artifact(model, ds, tmp_path / "q", qcfg)
    return info, task_for_model(ds, model)


@pytest.mark.parametrize(
    "method", [("weight_only_int8", "torchao"), ("dynamic_int8", "torchao"),
               ("dynamic_int8", "fbgemm")],
    ids=["weight-only", "dynamic-torchao", "dynamic-fbgemm"],
)  # fmt: skip
def test_linear_methods_quantize_the_heads_and_reload(model_dir, tmp_path, method):
    name, backend = method
    info, task = _quantize(model_dir, tmp_path, method=name, dynamic_backend=backend,
                               max_accuracy_drop=1.0)  # fmt: skip
    assert info.format == "detector" and info.name == f"{name}/{backend}"
    assert info.metric == "map" and info.gate_passed
    assert 0 < info.size_bytes < info.fp32_size_bytes
    assert info.latency_ms_b1 > 0 and info.latency_ms_b8 > 0
    assert info.fp32 is not None and info.fp32.latency_ms_b8 > 0
    model = load_quantized(tmp_path / "q", model_dir[1], task)
    fc6 = model.roi_heads.box_head.fc6  # int8: another module, or a quantized weight tensor
    assert type(fc6) is not nn.Linear or type(fc6.weight) not in (nn.Parameter, torch.Tensor)
    # What was measured is what was saved: the reloaded model scores the same.
    assert task.score(model, "val").values["map"] == pytest.approx(info.val_metric)


@pytest.mark.slow
def test_static_int8_backbone_reloads_and_scores_as_measured(model_dir, tmp_path):
    info, task = _quantize(model_dir, tmp_path, method="static_int8", max_accuracy_drop=1.0)
    assert info.name == "static_int8/x86_inductor" and info.runtime == "inductor"
    assert (tmp_path / "q" / qdet.BACKBONE_PROGRAM).is_file()
    model = load_quantized(tmp_path / "q", model_dir[1], task)
    assert isinstance(model.backbone, qdet.ProgramBackbone)
    assert task.score(model, "val").values["map"] == pytest.approx(info.val_metric)
    assert abs(info.accuracy_drop) < 0.5


class _HalfBlind(nn.Module):
    """A detector that loses the second half of its detections: an int8 model that lost mAP."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images, targets=None):
        out = self.inner(images)
        return [{k: v[: len(v) // 2] for k, v in o.items()} for o in out]


def test_the_gate_keeps_fp32_with_the_numbers_when_nothing_holds(model_dir, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    real = qdet.load_detector
    monkeypatch.setattr(qdet, "load_detector", lambda q, fp32: _HalfBlind(real(q, fp32)))
    info, _ = _quantize(model_dir, tmp_path, method="weight_only_int8", max_accuracy_drop=0.0,
                        on_drop="keep_fp32")  # fmt: skip
    (candidate,) = info.candidates
    if candidate.accuracy_drop <= 0:
        pytest.skip("the model found nothing to lose: no drop to gate on")
    assert info.method == "none" and info.gate_passed is False
    assert "keeping fp32" in info.decision and "over budget" in candidate.verdict
    assert QuantizedModel.load(tmp_path / "q").info.name == "none/fp32"
    with pytest.raises(KubetrainError, match="no int8 candidate within the accuracy budget"):
        _quantize(model_dir, tmp_path / "again", method="weight_only_int8",
                  max_accuracy_drop=0.0)  # fmt: skip


def test_what_does_not_apply_is_said():
    convs = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert "has no Linear layers" in qdet.not_applicable("weight_only_int8/torchao", convs)
    assert "needs a 'backbone'" in qdet.not_applicable("static_int8/x86_inductor", convs)
    assert "not offered for detectors" in qdet.not_applicable("qat_int8/x86_inductor", convs)
    with pytest.raises(ConfigError, match="quantize.method: dynamic_int8/torchao does not apply"):
        qdet._names(QuantizeConfig(method="dynamic_int8"), convs)
    names, skipped = qdet._names(QuantizeConfig(method="auto"), convs)
    assert names == [] and all(s.error.startswith("not applicable") for s in skipped)
