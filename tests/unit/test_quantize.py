from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from kubetrain.config import load_config
from kubetrain.data import load_dataset
from kubetrain.evaluate.measure import predict
from kubetrain.io import read_json
from kubetrain.quantize import load_model, load_quantized, quantize_artifact
from kubetrain.train.distributed import DistContext
from kubetrain.train.loop import fit, save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, digits_dir):
    cfg = load_config(overrides=["train.nproc=1", "train.epochs=4"])
    data = load_dataset(digits_dir)
    out = tmp_path_factory.mktemp("model")
    save_model(fit(cfg, data, DistContext()), cfg, data, out)
    return out


@pytest.mark.parametrize("method", ["weight_only_int8", "dynamic_int8"])
def test_int8_is_smaller_keeps_accuracy_and_reloads_in_a_fresh_process(
    tmp_path, model_dir, digits_dir, method
):
    info = quantize_artifact(model_dir, tmp_path, method)
    assert info["size_bytes"] < 0.35 * info["fp32_size_bytes"]
    data = load_dataset(digits_dir)
    x, y = data.split("test")
    fp32 = predict(load_model(model_dir), x, data.input_shape)
    int8_model = load_quantized(tmp_path)
    assert "Int8" in type(int8_model[1].weight).__name__  # really torchao int8 weights
    int8 = predict(int8_model, x, data.input_shape)
    assert abs((fp32 == y).mean() - (int8 == y).mean()) <= 0.01
    # A fresh interpreter rebuilds the artifact and predicts the same classes.
    code = (
        "import sys, numpy as np, torch; from kubetrain.quantize import load_quantized;"
        "m = load_quantized(sys.argv[1]); x = torch.from_numpy(np.load(sys.argv[2]));"
        "print(','.join(map(str, m(x.view(-1, 1, 8, 8)).argmax(1).tolist())))"
    )
    np.save(tmp_path / "x.npy", x[:50])
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(tmp_path / "x.npy")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    fresh = [int(v) for v in out.stdout.strip().splitlines()[-1].split(",")]
    assert fresh == int8[:50].tolist()


def test_none_keeps_fp32(tmp_path, model_dir):
    info = quantize_artifact(model_dir, tmp_path, "none")
    assert info["size_bytes"] == pytest.approx(info["fp32_size_bytes"], rel=0.01)
    a, b = load_model(model_dir), load_quantized(tmp_path)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_artifact_is_loaded_with_safe_deserialisation(tmp_path, model_dir):
    quantize_artifact(model_dir, tmp_path, "weight_only_int8")
    torch.load(tmp_path / "model.pt", weights_only=True)  # raises if it needed pickle code
    assert read_json(tmp_path / "quant.json")["method"] == "weight_only_int8"
