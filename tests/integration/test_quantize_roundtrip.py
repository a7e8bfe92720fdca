"""Every quantization method round-trips through its saved artifact in a fresh process that
never imports kubetrain (a process per method; the PT2E ones compile)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kubetrain.data import load_dataset
from kubetrain.quantize import load_model, load_quantized, quantize_artifact
from kubetrain.tasks.measure import predict
from tests.conftest import quick_quantize_config

# What a user without kubetrain runs: torch (+ torchao for its ops) and quant.json.
FRESH_LOADER = """
import json, sys, importlib, numpy as np, torch
qdir = sys.argv[1]
info = json.load(open(qdir + "/quant.json"))
if info["format"] == "torchscript":
    model = torch.jit.load(qdir + "/" + info["file"])
else:
    for name in info["imports"]:
        importlib.import_module(name)
    model = torch.export.load(qdir + "/" + info["file"]).module()
    if info["runtime"] == "inductor":
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True
        model = torch.compile(model, dynamic=False)
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    pred = model(x).argmax(1).tolist()
assert not any(m.startswith("kubetrain") for m in sys.modules), "kubetrain was imported"
print(",".join(map(str, pred)))
"""


@pytest.mark.parametrize(
    "method,backend",
    [
        ("weight_only_int8", "torchao"),
        ("dynamic_int8", "torchao"),
        ("dynamic_int8", "fbgemm"),
        ("static_int8", "torchao"),
        ("qat_int8", "torchao"),
        ("none", "torchao"),
    ],
    ids=["weight_only", "dynamic-torchao", "dynamic-fbgemm", "static-pt2e", "qat-pt2e", "none"],
)
def test_every_method_round_trips_in_a_fresh_process_without_kubetrain(
    tmp_path, model_dir, digits_dir, method, backend
):
    out = tmp_path / "q"
    info = quantize_artifact(
        model_dir,
        digits_dir,
        out,
        quick_quantize_config(
            method=method, dynamic_backend=backend, max_accuracy_drop=0.02, qat_on_drop=False
        ),
    )
    assert info.method == method
    if method != "none":
        assert (info.size_bytes or 0) <= 0.30 * (info.fp32_size_bytes or 0)
    assert not (out / "candidates").exists()
    data = load_dataset(digits_dir)
    x, y = data.split("test")
    fp32 = predict(load_model(model_dir), x, data.input_shape)
    here = predict(load_quantized(out), x, data.input_shape)
    assert abs((fp32 == y).mean() - (here == y).mean()) <= 0.02
    np.save(tmp_path / "x.npy", x[:64].reshape(-1, *data.input_shape))
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_LOADER, str(out), str(tmp_path / "x.npy")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = [int(v) for v in proc.stdout.strip().splitlines()[-1].split(",")]
    assert np.mean(np.array(fresh) == here[:64]) >= 0.98  # int8 kernels may differ in a tie
