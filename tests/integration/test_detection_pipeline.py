"""Detection through the real pipeline: ``kubetrain run --config detection`` on a COCO folder
the test writes (every step under kfp.local, 2 torchrun workers, int8, the gate on mAP@.5),
with a torchvision detector and with a user's own factory; the report draws the boxes; a bad
annotation file is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torchvision", reason="detection needs the vision extra")
pytest.importorskip("pycocotools", reason="detection's mAP needs the vision extra")

from detection_data import coco_folder
from tests.conftest import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.vision, pytest.mark.slow]

# The recipe, on a small folder of shapes: fewer epochs, a bar for 3 classes.
COMMON = [
    "--set", "data.limit=null", "--set", "data.image_mode=RGB", "--set", "data.shard_samples=64",
    "--set", "train.batch_size=8", "--set", "quantize.calibration_samples=16",
    "--set", "quantize.auto_candidates=[weight_only_int8/torchao, dynamic_int8/fbgemm]",
    "--set", "evaluate.latency_repeats=3",
]  # fmt: skip
MODELS = {
    "torchvision": [
        "--set", "model.name=torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
        "--set", "model.kwargs={min_size: 160, max_size: 160, box_batch_size_per_image: 64, "
                 "rpn_pre_nms_top_n_train: 600, rpn_post_nms_top_n_train: 300}",
        # From scratch a MobileNetV3 FPN learns slowly (SGD steadier than AdamW here): in this
        # budget it reaches about 0.05-0.1 mAP@.5, against 0.001 for a guessing detector.
        "--set", "train.epochs=6", "--set", "train.optimizer=sgd", "--set", "train.lr=0.01",
        "--set", "train.warmup_steps=20",
    ],
    "own-factory": [
        "--set", "model.name=detection_factory:tiny_detector",
        "--set", "model.kwargs={width: 24, size: 80}",
        "--set", "train.epochs=8", "--set", "train.lr=0.005",
        # A search (Optuna, 2 trials of 1 epoch in parallel) on val_map first.
        "--set", "tune.enabled=true", "--set", "tune.max_trials=2",
        "--set", "tune.parallel_trials=2", "--set", "tune.trial_epochs=1",
        "--set", "tune.trial_nproc=1",
        "--set", "tune.parameters=[{name: train.lr, parameterType: double, "
                 "feasibleSpace: {min: '0.003', max: '0.008'}}]",
    ],
}  # fmt: skip


@pytest.mark.parametrize("model", sorted(MODELS))
def test_kubetrain_run_config_detection_on_a_coco_folder(tmp_path, monkeypatch, model):
    """240 images of 3 shapes (about 10 % without objects), category ids with gaps (1, 3, 7):
    preprocess, DDP training, int8 on the heads, COCO evaluation, the gate, the report, from one
    command; the model clears a bar far above a detector that only guesses."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[1]))  # the user's package
    coco_folder(tmp_path / "coco", count=240, category_ids=(1, 3, 7))
    out = tmp_path / "run"
    bar = 0.3 if model == "own-factory" else 0.04
    proc = run_cli(
        "run", "--config", "detection", "--output", str(out),
        "--set", f"data.source={tmp_path / 'coco'}", "--set", f"evaluate.min_value={bar}",
        *COMMON, *MODELS[model],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset_kind"] == "detection" and metrics["metric"] == "map_50"
    assert metrics["train_world_size"] == 2 and metrics["train_ranks_identical"] is True
    fp32, int8 = metrics["test_map_50_fp32"], metrics["test_map_50_int8"]
    guess = metrics["test_guess_baseline_map_50_fp32"]
    assert fp32 >= bar and fp32 > 5 * guess, (fp32, guess)
    assert abs(fp32 - int8) <= 0.05
    assert metrics["promoted"] is (min(fp32, int8) >= bar)
    assert metrics["quantize_candidate"] in (
        "weight_only_int8/torchao", "dynamic_int8/fbgemm", "none/fp32"
    )  # fmt: skip
    report = (out / "report.html").read_text()
    assert "Test images, most errors first" in report and "alt='test image'" in report
    assert "Precision-recall per class" in report
    for name in ("square", "disc", "triangle"):
        assert name in report
    if model == "own-factory":
        details = json.loads(next(out.rglob("evaluate/**/details.json")).read_text())
        assert metrics["tune_trials"] == 2 and details["tuning"]["objective"] == "val_map"
    spec = json.loads(next(out.rglob("train/model/model.json")).read_text())
    assert spec["detection"]["categories"] == [{"id": 1, "name": "square"},
                                               {"id": 3, "name": "disc"},
                                               {"id": 7, "name": "triangle"}]  # fmt: skip


def test_a_bad_annotation_file_is_one_line(tmp_path):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "instances_train.json").write_text("{oops")
    proc = run_cli("run", "--config", "detection", "--output", str(tmp_path / "run"),
                   "--set", f"data.source={tmp_path / 'coco'}")  # fmt: skip
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if "data error" in line]
    assert len(lines) == 1 and "instances_train.json: not valid JSON" in lines[0]
    assert "Traceback" not in proc.stderr
