from __future__ import annotations

import logging

import pytest
import torch

from kubetrain.core.distributed import DistContext
from kubetrain.data import load_dataset
from kubetrain.pipeline.config import load_config
from kubetrain.tasks import open_task
from kubetrain.train.loop import Stopped, fit

BASE = ["train.nproc=1", "train.epochs=4", "train.checkpoint_every_steps=7", "train.seed=2"]


def _weights(result) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_dir):
    cfg = load_config(overrides=BASE)
    directory = tmp_path_factory.mktemp("c")
    result = fit(
        cfg, open_task(cfg, load_dataset(digits_dir)), DistContext(), checkpoint_dir=directory
    )
    return _weights(result), result, directory


def _interrupted(tmp_path, digits_dir, *extra):
    """Train until the end of epoch 2, as if the process died there."""
    cfg = load_config(overrides=[*BASE, *extra])
    with pytest.raises(Stopped):
        fit(cfg, open_task(cfg, load_dataset(digits_dir)), DistContext(), on_epoch=lambda s: s.epoch == 2,
            checkpoint_dir=tmp_path)  # fmt: skip
    return cfg


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(
    tmp_path, digits_dir, uninterrupted
):
    cfg = _interrupted(tmp_path, digits_dir)
    # 2 epochs = 38 steps; the newest checkpoint is step 35, in the middle of epoch 2.
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == [
        "ckpt-00000028.pt",
        "ckpt-00000035.pt",
    ]
    resumed = fit(
        cfg, open_task(cfg, load_dataset(digits_dir)), DistContext(), checkpoint_dir=tmp_path
    )
    assert resumed.summary.resumed_from_step == 35
    assert _same(_weights(resumed), uninterrupted[0])
    assert [h.epoch for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[1].train_loss == pytest.approx(uninterrupted[1].history[1].train_loss)


@pytest.mark.parametrize("damage", ["truncate", "no-manifest", "other-config"])
def test_a_bad_newest_checkpoint_is_skipped_with_a_warning(
    tmp_path, digits_dir, uninterrupted, damage, caplog
):
    cfg = _interrupted(tmp_path, digits_dir)
    newest = tmp_path / "ckpt-00000035.pt"
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:1000])
    elif damage == "no-manifest":
        newest.with_suffix(".json").unlink()
    else:
        cfg = cfg.with_params({"train.lr": 0.01})
    with caplog.at_level(logging.WARNING):
        resumed = fit(
            cfg, open_task(cfg, load_dataset(digits_dir)), DistContext(), checkpoint_dir=tmp_path
        )
    assert "skipping checkpoint" in caplog.text and "ckpt-00000035.pt" in caplog.text
    if damage == "other-config":  # neither checkpoint is this job's: it starts afresh
        assert resumed.summary.resumed_from_step is None
    else:
        assert resumed.summary.resumed_from_step == 28
        assert _same(_weights(resumed), uninterrupted[0])


def test_resume_can_be_turned_off(tmp_path, digits_dir):
    cfg = _interrupted(tmp_path, digits_dir)
    fresh_cfg = cfg.with_params({"train.resume": False})
    fresh = fit(fresh_cfg, open_task(fresh_cfg, load_dataset(digits_dir)), DistContext(),
                checkpoint_dir=tmp_path)  # fmt: skip
    assert fresh.summary.resumed_from_step is None


def test_only_the_newest_checkpoints_are_kept_and_cost_is_measured(uninterrupted):
    _, result, directory = uninterrupted
    assert result.summary.checkpoints_written == 76 // 7 + 1  # every 7 steps + the end
    kept = sorted(p.name for p in directory.glob("ckpt-*.pt"))
    assert kept == ["ckpt-00000070.pt", "ckpt-00000076.pt"]  # train.keep_checkpoints = 2
    assert 0 < result.summary.checkpoint_seconds < result.summary.train_seconds
