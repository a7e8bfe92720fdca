"""Quantization: the accuracy gate both ways; auto's choice and its reason. (Every method's
round trip through a fresh process: tests/integration/test_quantize_roundtrip.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pydantic import ValidationError

from kubetrain.core.errors import KubetrainError
from kubetrain.core.records import Candidate
from kubetrain.data import load_dataset
from kubetrain.quantize import load_model, load_quantized, quantize_artifact, select
from kubetrain.quantize.config import QuantizeConfig
from kubetrain.tasks.measure import predict
from tests.conftest import quick_quantize_config


def test_auto_keeps_the_fastest_within_budget_and_records_why(tmp_path, model_dir, digits_dir):
    qcfg = quick_quantize_config(
        auto_candidates=["weight_only_int8/torchao", "dynamic_int8/fbgemm"]
    )
    info = quantize_artifact(model_dir, digits_dir, tmp_path, qcfg)
    saved = json.loads((tmp_path / "quant.json").read_text())
    assert saved["name"] == info.name and saved["gate_passed"] is True
    names = [c["name"] for c in saved["candidates"]]
    assert names == ["weight_only_int8/torchao", "dynamic_int8/fbgemm"]
    ok = [c for c in saved["candidates"] if c["accuracy_drop"] <= qcfg.max_accuracy_drop]
    assert saved["name"] == min(ok, key=lambda c: c["latency_ms_b64"])["name"]
    assert saved["decision"].startswith(f"kept {saved['name']}: batch-64 latency")
    for c in saved["candidates"]:
        for key in ("val_accuracy", "size_bytes", "latency_ms_b1", "latency_ms_b64", "verdict"):
            assert key in c
    for c in saved["candidates"]:
        assert c["verdict"].startswith(("chosen", "within budget, slower", "over budget: drop"))


@pytest.fixture(scope="module")
def outlier_dir(tmp_path_factory, model_dir):
    """The same function with 8 hidden units scaled up 1000x (and the next layer down 1000x):
    fp32 outputs are unchanged (ReLU is positively homogeneous), but per-tensor int8
    activations must now cover outlier channels, so post-training int8 really loses accuracy."""
    out = tmp_path_factory.mktemp("outlier")
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    model = load_model(model_dir)
    with torch.no_grad():
        model[1].weight[:8] *= 1000
        model[1].bias[:8] *= 1000
        model[3].weight[:, :8] /= 1000
    torch.save(model.state_dict(), out / "model.pt")
    return out


BAD_STATIC = {"method": "static_int8", "max_accuracy_drop": 0.005}


@pytest.mark.integration  # seconds of QAT / torchrun workers: out of the unit tier
def test_gate_fails_with_the_numbers(tmp_path, outlier_dir, digits_dir):
    with pytest.raises(KubetrainError, match=r"no int8 candidate within the accuracy budget") as e:
        quantize_artifact(
            outlier_dir,
            digits_dir,
            tmp_path,
            quick_quantize_config(**BAD_STATIC, qat_on_drop=False),
        )
    assert "static_int8/x86_inductor (over budget: drop +0." in str(e.value)
    assert "fp32 validation accuracy 0." in str(e.value)
    assert not (tmp_path / "quant.json").exists()  # nothing half-written


def test_gate_can_keep_fp32(tmp_path, outlier_dir, digits_dir):
    qcfg = quick_quantize_config(**BAD_STATIC, qat_on_drop=False, on_drop="keep_fp32")
    info = quantize_artifact(outlier_dir, digits_dir, tmp_path, qcfg)
    assert info.method == "none" and info.gate_passed is False
    assert "keeping fp32" in info.decision
    data = load_dataset(digits_dir)
    x, _ = data.split("test")
    same = predict(load_quantized(tmp_path), x, data.input_shape)
    assert (same == predict(load_model(outlier_dir), x, data.input_shape)).all()


@pytest.mark.integration  # seconds of QAT / torchrun workers: out of the unit tier
def test_gate_tries_qat_when_post_training_int8_loses_too_much(tmp_path, outlier_dir, digits_dir):
    qcfg = quick_quantize_config(**BAD_STATIC, on_drop="keep_fp32")
    info = quantize_artifact(outlier_dir, digits_dir, tmp_path, qcfg)
    static, qat = info.candidates
    assert static.name == "static_int8/x86_inductor" and static.accuracy_drop > 0.5
    assert qat.name == "qat_int8/x86_inductor" and qat.qat.epochs == 1
    assert qat.accuracy_drop <= 0.02  # recovers (nearly) all of it


@pytest.mark.parametrize(
    ("mode", "drop_from", "drop_to"),
    [("search", -0.02, 0.02), ("minmax", 0.1, 1.0)],
    ids=["search-clips-the-outliers", "minmax-cannot"],
)
def test_qat_activation_ranges(tmp_path, outlier_dir, digits_dir, mode, drop_from, drop_to):
    """The outlier channels (1000x) take a min-max range, leaving the other channels a level or
    two: fine-tuning does not get that back. The range search clips them (they matter little)."""
    qcfg = quick_quantize_config(method="qat_int8", qat_activation_ranges=mode, on_drop="keep_fp32")
    info = quantize_artifact(outlier_dir, digits_dir, tmp_path, qcfg)
    qat = info.candidates[0]
    assert drop_from <= qat.accuracy_drop <= drop_to
    ranges = qat.qat.activation_ranges
    assert ranges["mode"] == mode
    if mode == "search":
        assert len(ranges["fractions"]) == 3  # the inputs of the three Linear layers
        assert min(ranges["fractions"].values()) < 0.1  # the hidden activation with outliers
        assert ranges["output_mse_searched"] < ranges["output_mse_minmax"] / 10


def test_qat_activation_ranges_are_validated():
    with pytest.raises(ValidationError, match="qat_activation_ranges"):
        QuantizeConfig(qat_activation_ranges="histogram")


@pytest.mark.parametrize(
    "drops,expected",
    [
        ({"a": 0.0, "b": 0.001}, "b"),  # both within budget: the faster (b) wins
        ({"a": 0.0, "b": 0.02}, "a"),  # b faster but over budget
        ({"a": 0.02, "b": 0.02}, None),
    ],
    ids=["fastest", "budget-first", "none"],
)
def test_choose_is_fastest_within_budget(drops, expected):
    candidates = [
        Candidate(name="a", accuracy_drop=drops["a"], latency_ms_b64=2.0),
        Candidate(name="b", accuracy_drop=drops["b"], latency_ms_b64=1.0),
    ]
    chosen = select.choose(candidates, 0.005)
    assert (chosen.name if chosen else None) == expected


class _SharedReLU(torch.nn.Module):
    """A residual block the way torchvision's ResNet writes it: one nn.ReLU called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv2(self.relu(self.conv1(x)))
        out += x
        return self.relu(out)


def test_each_call_of_a_shared_module_is_its_own_pt2e_partition():
    from torch.fx.passes.utils.source_matcher_utils import get_source_partitions
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from kubetrain.quantize.methods import _export_for_pt2e, _x86_quantizer

    example = torch.randn(2, 3, 8, 8)
    graph = _export_for_pt2e(_SharedReLU().eval(), example)
    (relus,) = get_source_partitions(graph.graph, [torch.nn.ReLU]).values()
    assert len(relus) == 2 and all(len(p.output_nodes) == 1 for p in relus)
    # Plain torch.export gives one partition with two outputs, which the x86 quantizer refuses.
    prepared = prepare_pt2e(graph, _x86_quantizer(quick_quantize_config()))
    observers = [n for n in prepared.graph.nodes if "activation_post_process" in str(n.target)]
    assert observers  # annotated and observed (conv+add+ReLU fused as one pattern)
    assert prepared(example).shape == example.shape


class _ConvBN(torch.nn.Module):
    """Conv + batch norm with MobileNetV3's batch-norm settings (eps 1e-3, momentum 0.01), and
    a second batch norm that follows no convolution (``after_relu``)."""

    def __init__(self, after_relu: bool = False) -> None:
        super().__init__()
        self.after_relu = after_relu
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.01)
        self.head = torch.nn.Linear(4, 2)
        torch.manual_seed(0)
        with torch.no_grad():  # running statistics far from the defaults, variance near eps
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(1e-5, 1e-4)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(torch.relu(x)) if self.after_relu else torch.relu(self.bn(x))
        return self.head(x.mean((2, 3)))


def test_qat_folds_batch_norms_with_their_own_eps():
    """QAT int8 of a conv + batch norm with eps 1e-3 computes the fp32 function (torchao's QAT
    conv + batch-norm pattern folded it with eps 1e-5)."""
    from kubetrain.quantize import methods

    model = _ConvBN().eval()
    x = torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(64, dtype=torch.long)
    qcfg = quick_quantize_config(qat_lr=1e-9, qat_batch_size=16, calibration_samples=64)
    converted, _ = methods._pt2e_qat(model, x.numpy(), y.numpy(), [3, 6, 6], qcfg)
    with torch.no_grad():
        reference, out = model(x), converted(x)
    # measured: 0.014 of the largest output; folded with eps 1e-5 it was 0.093
    assert (out - reference).abs().max() < 0.04 * reference.abs().max()


@pytest.mark.parametrize("restore", [True, False], ids=["restored", "torchao-defaults"])
def test_mode_switches_keep_each_batch_norms_eps_and_momentum(restore):
    """A batch norm that QAT does not fold keeps its eps and momentum through the switches
    between train and eval mode (torchao rewrites them with 1e-5 and 0.1)."""
    from torchao.quantization.pt2e import (
        disable_fake_quant,
        disable_observer,
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from kubetrain.quantize import methods

    model = _ConvBN(after_relu=True).eval()
    x = torch.randn(8, 3, 6, 6)
    reference = model(x)
    graph = methods._export_for_pt2e(model, x)
    literals = methods._batch_norm_literals(graph)
    prepared = prepare_qat_pt2e(graph, methods._x86_quantizer(quick_quantize_config(), True))
    prepared.apply(disable_fake_quant)
    prepared.apply(disable_observer)
    for move in (move_exported_model_to_train, move_exported_model_to_eval):
        move(prepared)
        if restore:
            methods._restore_batch_norm_literals(prepared, literals)
    norms = [n for n in prepared.graph.nodes if n.target in methods._BATCH_NORMS]
    assert norms and all(n.args[6:8] == ((0.01, 1e-3) if restore else (0.1, 1e-5)) for n in norms)
    with torch.no_grad():
        close = torch.allclose(prepared(x), reference, atol=1e-4)
    assert close is restore
