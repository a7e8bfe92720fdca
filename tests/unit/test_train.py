from __future__ import annotations

import math
import re

import pytest
import torch

from kubetrain.core.distributed import DistContext
from kubetrain.core.errors import ConfigError
from kubetrain.data import load_dataset
from kubetrain.models import build_model
from kubetrain.pipeline.config import load_config
from kubetrain.tasks import open_task
from kubetrain.train.loop import Stopped, fit
from kubetrain.train.optim import lr_factor
from tests.conftest import assert_one_train_error_and_no_model


def _fit(digits_dir, *overrides):
    cfg = load_config(overrides=["train.nproc=1", "train.epochs=2", *overrides])
    return fit(cfg, open_task(cfg, load_dataset(digits_dir)), DistContext())


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def test_training_learns_digits_and_records_every_epoch(digits_dir):
    result = _fit(digits_dir, "train.epochs=4")
    assert [h.epoch for h in result.history] == [1, 2, 3, 4]
    assert result.history[-1].train_loss < result.history[0].train_loss / 3
    assert result.history[-1].val_accuracy > 0.93
    for h in result.history:
        assert h.samples_per_second > 0 and 0 <= h.data_wait_share < 1 and h.step_seconds > 0
    s = result.summary
    assert s.steps == 4 * (1257 // 64) and s.samples_seen == s.steps * 64
    assert s.ranks_identical is True


def test_gradient_accumulation_matches_one_big_batch(digits_dir):
    plain = _fit(digits_dir, "train.batch_size=64", "train.grad_accum_steps=1")
    accum = _fit(digits_dir, "train.batch_size=64", "train.grad_accum_steps=4")
    assert _max_diff(plain.model, accum.model) < 1e-5
    other = _fit(digits_dir, "train.batch_size=32")  # and the test can tell batches apart
    assert _max_diff(plain.model, other.model) > 1e-3


def test_seed_makes_runs_identical(digits_dir):
    a = _fit(digits_dir, "train.seed=3", "train.epochs=1")
    b = _fit(digits_dir, "train.seed=3", "train.epochs=1")
    c = _fit(digits_dir, "train.seed=4", "train.epochs=1")
    assert _max_diff(a.model, b.model) == 0.0
    assert _max_diff(a.model, c.model) > 1e-3


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "rmsprop", "sgd"])
def test_every_optimizer_trains(digits_dir, optimizer):
    lr = {"sgd": 0.1, "rmsprop": 1e-3}.get(optimizer, 3e-3)
    result = _fit(digits_dir, f"train.optimizer={optimizer}", f"train.lr={lr}")
    assert result.history[-1].val_accuracy > 0.85


def test_cnn_trains_with_augmentation(digits_dir):
    result = _fit(digits_dir, "model.name=cnn", "data.augment=true", "train.epochs=3")
    assert result.history[-1].val_accuracy > 0.9
    assert any(isinstance(m, torch.nn.Conv2d) for m in result.model.modules())


def test_cnn_refuses_tabular_shapes():
    cfg = load_config(overrides=["model.name=cnn"])
    with pytest.raises(ConfigError, match="model.name: 'cnn' needs image data"):
        build_model(cfg.model, [20], 3)


def test_epoch_callback_can_stop_training(digits_dir):
    cfg = load_config(overrides=["train.nproc=1", "train.epochs=5"])
    seen = []
    with pytest.raises(Stopped):
        fit(
            cfg,
            open_task(cfg, load_dataset(digits_dir)),
            DistContext(),
            on_epoch=lambda s: seen.append(s) or s.epoch == 2,
        )
    assert [s.epoch for s in seen] == [1, 2]


def test_batch_larger_than_data_is_refused(digits_dir):
    cfg = load_config(overrides=["train.nproc=1", "train.batch_size=4096"])
    with pytest.raises(ConfigError, match="exceeds the 1257 training samples"):
        fit(cfg, open_task(cfg, load_dataset(digits_dir)), DistContext())


@pytest.mark.parametrize(
    ("overrides", "step", "expected"),
    [
        (["train.lr_schedule=cosine"], 0, 1.0),
        (["train.lr_schedule=cosine"], 50, 0.5),
        (["train.lr_schedule=cosine"], 100, 0.0),
        (["train.lr_schedule=step", "train.step_size=5", "train.gamma=0.5"], 49, 1.0),
        (["train.lr_schedule=step", "train.step_size=5", "train.gamma=0.5"], 50, 0.5),
        (["train.lr_schedule=constant", "train.warmup_epochs=2"], 4, 0.25),
        (["train.lr_schedule=constant", "train.warmup_epochs=2"], 60, 1.0),
    ],
    ids=["cos-start", "cos-mid", "cos-end", "step-before", "step-after", "warmup", "const"],
)
def test_lr_schedules(overrides, step, expected):
    tc = load_config(overrides=["train.epochs=10", *overrides]).train
    assert math.isclose(lr_factor(step, tc, steps_per_epoch=10), expected, abs_tol=1e-9)


def test_bf16_autocast_trains_close_to_fp32(digits_dir):
    fp32 = _fit(digits_dir, "train.epochs=3")
    bf16 = _fit(digits_dir, "train.epochs=3", "train.precision=bf16")
    assert bf16.summary.precision == "bf16"
    assert abs(bf16.history[-1].val_accuracy - fp32.history[-1].val_accuracy) <= 0.02
    assert _max_diff(bf16.model, fp32.model) > 0  # it really computed in another precision


def test_precision_is_chosen_per_device(digits_dir):
    from kubetrain.train.instrument import cpu_has_native_bf16
    from kubetrain.train.loop import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ConfigError, match="train.precision: fp16 needs a GPU"):
        resolve_precision("fp16", cpu)


def test_step_time_is_split_and_flops_counted(digits_dir):
    result = _fit(digits_dir)
    s, h = result.summary, result.history[-1]
    parts = h.data_seconds + h.compute_seconds + h.optimizer_seconds
    assert 0.5 * h.epoch_seconds < parts <= h.epoch_seconds * 1.001
    # MLP 64-256-128-10: forward 2*(64*256 + 256*128 + 128*10) FLOPs, backward about twice that.
    forward = 2 * (64 * 256 + 256 * 128 + 128 * 10)
    assert 2.5 * forward <= s.flops_per_sample <= 3.5 * forward
    assert 0 < s.mfu < 1
    assert s.cpu_percent > 0 and s.peak_rss_mib > 50


def _poisoned(digits_dir, tmp_path):
    """The digits dataset with training features that overflow float32 matmuls."""
    import numpy as np

    from kubetrain.core.artifacts import DatasetArtifact

    data = load_dataset(digits_dir)
    arrays = dict(data.arrays)
    arrays["x_train"] = arrays["x_train"].copy()
    arrays["x_train"][:, :] = np.float32(3e38)
    DatasetArtifact(tmp_path / "poisoned", data.meta, arrays).save(tmp_path / "poisoned")
    return load_dataset(tmp_path / "poisoned")


@pytest.mark.parametrize(
    ("setting", "data"),
    [
        (["train.lr=1e6"], "digits"),
        ([], "poisoned"),
        (["train.lr=1e6", "model.name=vision_factory:unused_last_parameter"], "digits"),
    ],
    ids=["learning-rate-too-high", "overflowing-features", "last-parameter-without-gradient"],
)
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    digits_dir, tmp_path, setting, data
):
    from kubetrain.train import checkpoint
    from kubetrain.train.loop import NonFiniteLoss, resume_key

    dataset = load_dataset(digits_dir) if data == "digits" else _poisoned(digits_dir, tmp_path)
    cfg = load_config(
        overrides=["train.nproc=1", "train.epochs=2", "train.checkpoint_every_steps=1", *setting]
    )
    ckpts = tmp_path / "ckpt"
    with pytest.raises(NonFiniteLoss) as info:
        fit(cfg, open_task(cfg, dataset), DistContext(), checkpoint_dir=ckpts)
    message = str(info.value)
    assert info.value.exit_code == 1 and "\n" not in message
    assert re.search(r"at epoch 1, step \d+ \(optimizer step \d+\)", message)
    assert "learning rate" in message and "bad input data" in message
    failed_at = int(re.search(r"optimizer step (\d+)", message).group(1))
    state = checkpoint.load_latest(ckpts, resume_key(cfg, dataset))
    if failed_at == 1:  # nothing good was ever reached: nothing is kept
        assert state is None
    else:  # the checkpoint of the step before, with finite weights
        assert state["global_step"] == failed_at - 1
        assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.integration  # seconds of QAT / torchrun workers: out of the unit tier
def test_a_non_finite_loss_stops_every_torchrun_worker_with_one_line(digits_dir, tmp_path, capfd):
    from kubetrain.core.errors import KubetrainError
    from kubetrain.launch.local import LocalLauncher

    settings = ["train.nproc=2", "train.epochs=2", "train.lr=1e6", "train.num_threads=1",
                "train.checkpoint_every_steps=1"]  # fmt: skip
    cfg = load_config(overrides=settings)
    with pytest.raises(KubetrainError, match="training failed"):
        LocalLauncher().run(cfg, digits_dir, tmp_path / "model")
    assert_one_train_error_and_no_model(capfd.readouterr().err, tmp_path / "model")


def test_the_train_step_exits_1_with_one_line_on_a_non_finite_loss(digits_dir, tmp_path):
    from tests.conftest import run_cli

    proc = run_cli(
        "train", "--dataset", str(digits_dir), "--output", str(tmp_path / "m"),
        "--set", "train.nproc=1", "--set", "train.lr=1e6", "--set", "train.epochs=1",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"train error: .* at epoch 1, step \d+", last), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m" / "model.json").exists()
