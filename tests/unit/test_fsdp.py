"""train.strategy=fsdp in one process: sharding units, config checks, DCP checkpoints.

Several processes (real torchrun workers, FSDP2 over gloo) are in
tests/integration/test_fsdp.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from kubetrain.core.distributed import DistContext
from kubetrain.core.errors import ConfigError
from kubetrain.core.io import read_json
from kubetrain.data import load_dataset
from kubetrain.models.transformer import (
    Seq2SeqTransformer,
    TransformerClassifier,
    TransformerConfig,
)
from kubetrain.pipeline.config import load_config
from kubetrain.tasks import open_task
from kubetrain.train.distributed import shard_units
from kubetrain.train.loop import Stopped, fit
from kubetrain.train.trainer import resume_key

BASE = ["train.nproc=1", "train.epochs=4", "train.checkpoint_every_steps=7", "train.seed=2",
        "train.strategy=fsdp"]  # fmt: skip
SIZES = TransformerConfig(d_model=16, heads=2, layers=2, ff=32, max_len=16)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10)
        self.out.weight = self.inp.weight


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)])
        self.head = nn.Linear(4, 2)


def _units(model: nn.Module) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(u)] for u in shard_units(model)]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)), ["1", "3"]),
        (TransformerClassifier(50, 3, SIZES, 0), ["encoder.layers.0", "encoder.layers.1"]),
        (
            Seq2SeqTransformer(50, SIZES, 0, 1, 2),  # embedding and output layer stay in the root
            ["encoder.layers.0", "encoder.layers.1", "decoder.0", "decoder.1"],
        ),
        (_Blocks(), ["blocks.0", "blocks.2"]),
        (_Tied(), ["mid"]),
    ],
    ids=[
        "mlp-children",
        "classifier-layers",
        "seq2seq-layers-not-tied-embedding",
        "modulelist-entries",
        "tied-children-left-to-root",
    ],
)
def test_shard_units(model, expected):
    assert _units(model) == expected


def test_fsdp_refuses_fp16_and_is_a_run_only_choice(digits_dir):
    with pytest.raises(ConfigError, match="train: strategy fsdp does not support precision fp16"):
        load_config(overrides=["train.strategy=fsdp", "train.precision=fp16"])
    data = load_dataset(digits_dir)
    ddp, fsdp = (load_config(overrides=[f"train.strategy={s}"]) for s in ("ddp", "fsdp"))
    assert resume_key(ddp, data) == resume_key(fsdp, data)  # how it runs, not what it computes


def _weights(result) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in result.model.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_dir):
    cfg = load_config(overrides=BASE)
    directory = tmp_path_factory.mktemp("c")
    result = fit(
        cfg, open_task(cfg, load_dataset(digits_dir)), DistContext(), checkpoint_dir=directory
    )
    return _weights(result), result, directory


def _interrupted(tmp_path, digits_dir):
    """Train until the end of epoch 2, as if the process died there."""
    cfg = load_config(overrides=BASE)
    with pytest.raises(Stopped):
        fit(cfg, open_task(cfg, load_dataset(digits_dir)), DistContext(), on_epoch=lambda s: s.epoch == 2,
            checkpoint_dir=tmp_path)  # fmt: skip
    return cfg


def test_sharded_checkpoints_are_directories_with_a_manifest(uninterrupted):
    _, result, directory = uninterrupted
    # 4 epochs x 19 steps: every 7 steps and the end; the newest 2 kept, no partial left.
    assert sorted(p.name for p in directory.iterdir()) == ["step-00000070", "step-00000076"]
    assert result.summary.checkpoints_written == 76 // 7 + 1
    newest = directory / "step-00000076"
    manifest = read_json(newest / "manifest.json")
    assert manifest["step"] == 76
    assert set(manifest["files"]) == {p.name for p in newest.iterdir()} - {"manifest.json"}
    assert {".metadata", "trainer.pt"} <= set(manifest["files"])


def test_sharded_resume_ends_with_the_same_weights(tmp_path, digits_dir, uninterrupted):
    cfg = _interrupted(tmp_path, digits_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000028", "step-00000035"]
    resumed = fit(
        cfg, open_task(cfg, load_dataset(digits_dir)), DistContext(), checkpoint_dir=tmp_path
    )
    assert resumed.summary.resumed_from_step == 35
    expected = uninterrupted[0]
    assert all(torch.equal(v, expected[k]) for k, v in _weights(resumed).items())
    assert [h.epoch for h in resumed.history] == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["truncate-shard", "no-manifest", "other-config", "extra-file"])
def test_a_bad_newest_sharded_checkpoint_is_skipped(
    tmp_path, digits_dir, uninterrupted, damage, caplog
):
    cfg = _interrupted(tmp_path, digits_dir)
    newest = tmp_path / "step-00000035"
    if damage == "truncate-shard":
        shard = next(newest.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "no-manifest":
        (newest / "manifest.json").unlink()
    elif damage == "extra-file":
        (newest / "stray.distcp").write_bytes(b"x")
    else:
        cfg = cfg.with_params({"train.lr": 0.01})
    with caplog.at_level(logging.WARNING):
        resumed = fit(
            cfg, open_task(cfg, load_dataset(digits_dir)), DistContext(), checkpoint_dir=tmp_path
        )
    assert "skipping checkpoint" in caplog.text and "step-00000035" in caplog.text
    if damage == "other-config":
        assert resumed.summary.resumed_from_step is None
    else:
        assert resumed.summary.resumed_from_step == 28
        expected = uninterrupted[0]
        assert all(torch.equal(v, expected[k]) for k, v in _weights(resumed).items())


@pytest.mark.parametrize(("wrote", "reads"), [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_checkpoints_of_the_other_strategy_are_not_resumed(
    tmp_path, digits_dir, wrote, reads, caplog
):
    short = ["train.nproc=1", "train.epochs=1", "train.checkpoint_every_steps=7"]
    data = load_dataset(digits_dir)
    first = load_config(overrides=[*short, f"train.strategy={wrote}"])
    fit(first, open_task(first, data), DistContext(), checkpoint_dir=tmp_path)
    second = load_config(overrides=[*short, f"train.strategy={reads}"])
    with caplog.at_level(logging.WARNING):
        again = fit(second, open_task(second, data), DistContext(), checkpoint_dir=tmp_path)
    assert again.summary.resumed_from_step is None
    assert f"not resuming the {wrote.upper()} checkpoints" in caplog.text


def test_translation_gpu_recipe_is_a_sharded_bf16_cluster_run_of_about_100m_parameters():
    from kubetrain.core.errors import ConfigError

    try:
        cfg = load_config("translation-gpu")
    except ConfigError as err:  # the text sections (model sizes, seq2seq) land with issue 14
        pytest.skip(f"the text config is not in this tree yet: {err}")
    assert cfg.train.strategy == "fsdp" and cfg.train.precision == "bf16"
    assert (cfg.train.nnodes, cfg.train.nproc, cfg.cluster.num_gpus) == (2, 1, 1)
    sizes = TransformerConfig(d_model=cfg.model.d_model, heads=cfg.model.heads,
                              layers=cfg.model.layers, ff=cfg.model.ff)  # fmt: skip
    model = Seq2SeqTransformer(cfg.data.tokenizer.vocab_size, sizes, 0, 1, 2)
    assert 90e6 < sum(p.numel() for p in model.parameters()) < 130e6


def test_a_sharded_checkpoint_that_cannot_be_written_is_one_line_naming_it(tmp_path, digits_dir):
    from kubetrain.core.errors import KubetrainError

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the checkpoints should go")
    with pytest.raises(KubetrainError, match=r"cannot write .*not-a-directory") as info:
        cfg = load_config(overrides=BASE)
        fit(cfg, open_task(cfg, load_dataset(digits_dir)), DistContext(), checkpoint_dir=blocker)
    assert "\n" not in str(info.value)
    assert blocker.read_text() == "a file where the checkpoints should go"
