"""train.strategy=fsdp with real torchrun workers (FSDP2 over gloo on CPU): the sharded run
matches one process, writes a whole model, and its DCP checkpoints resume on another number of
processes (2 -> 1 and 1 -> 2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kubetrain.core.io import read_json
from kubetrain.launch.local import LocalLauncher
from kubetrain.pipeline.config import load_config
from tests.conftest import assert_one_train_error_and_no_model

BASE = ["train.epochs=3", "train.batch_size=64", "train.seed=7", "tune.enabled=false"]
# SGD (not Adam, whose update divides by tiny second moments) keeps the last-bit differences of
# splitting a batch over ranks at 1e-7 on this model: a real fault would show far above 1e-5.
TRANSFORMER = ["model.name=fsdp_factory:tiny_transformer", "train.optimizer=sgd", "train.lr=0.05"]


@pytest.fixture(autouse=True)
def _factory_importable(monkeypatch):
    # torchrun's workers are new interpreters: they find tests/fsdp_factory.py through this.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[1]))


def _train(out: Path, digits_dir, *overrides):
    cfg = load_config(overrides=[*BASE, *overrides])
    LocalLauncher().run(cfg, digits_dir, out)
    return torch.load(out / "model.pt", weights_only=True), read_json(out / "metrics.json")


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize(
    "layout",
    [
        [],
        ["train.grad_accum_steps=2", "train.max_grad_norm=0.5"],
        [*TRANSFORMER, "train.max_grad_norm=1.0"],
    ],
    ids=["mlp", "mlp-accum-clip", "transformer-layers-clip"],
)
def test_fsdp_on_two_processes_matches_one_process(tmp_path, digits_dir, layout):
    single, _ = _train(tmp_path / "one", digits_dir, "train.nproc=1", *layout)
    weights, metrics = _train(
        tmp_path / "fsdp", digits_dir, "train.nproc=2", "train.strategy=fsdp", *layout
    )
    assert metrics["world_size"] == 2 and metrics["ranks_identical"] is True
    # model.pt holds the whole (unsharded) weights, named as the unwrapped model names them.
    assert _max_diff(weights, single) < 1e-5
    assert all(v.dtype == torch.float32 for v in weights.values())


def test_fsdp_trains_with_bf16_weights_in_compute(tmp_path, digits_dir):
    weights, metrics = _train(
        tmp_path / "bf16", digits_dir, "train.nproc=2", "train.strategy=fsdp",
        "train.precision=bf16", "train.epochs=2",
    )  # fmt: skip
    assert metrics["precision"] == "bf16" and metrics["final_val_accuracy"] > 0.85
    assert all(v.dtype == torch.float32 for v in weights.values())  # stored in full precision


@pytest.mark.parametrize(("wrote", "resumes"), [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_fsdp_checkpoint_resumes_on_another_number_of_processes(
    tmp_path, digits_dir, wrote, resumes
):
    every = ["train.strategy=fsdp", "train.checkpoint_every_steps=7", "train.max_grad_norm=1.0",
             *TRANSFORMER]  # fmt: skip
    written = tmp_path / "written"
    reference, _ = _train(
        written, digits_dir, f"train.nproc={wrote}", "train.keep_checkpoints=100", *every
    )
    # As if the job had died after step 28 of 57: only the checkpoints up to there survive.
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(written / "checkpoints", checkpoints)
    for later in (p for p in checkpoints.iterdir() if p.name > "step-00000028"):
        shutil.rmtree(later)
    weights, metrics = _train(
        tmp_path / "resumed", digits_dir, f"train.nproc={resumes}",
        f"train.checkpoint_dir={checkpoints}", *every,
    )  # fmt: skip
    assert metrics["resumed_from_step"] == 28 and metrics["world_size"] == resumes
    assert _max_diff(weights, reference) < 1e-5
    assert [h["epoch"] for h in read_json(tmp_path / "resumed" / "history.json")] == [1, 2, 3]


def test_ranks_may_validate_unequal_parts_of_a_sharded_model(tmp_path):
    import subprocess
    import sys

    worker = Path(__file__).parents[1] / "fsdp_uneven_worker.py"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--standalone", str(worker), str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [read_json(tmp_path / f"rank{r}.json") for r in (0, 1)]
    assert [r["batches"] for r in ranks] == [1, 4]
    assert ranks[0]["last"] == ranks[1]["last"]  # the same whole model on both ranks
    assert ranks[0]["shard_rows"] == [8, 8, 2, 2]  # and sharded again after
    assert ranks[1]["shard_rows"] == [8, 8, 1, 1]


@pytest.mark.parametrize(
    "check", [[], ["train.max_grad_norm=1.0"]], ids=["gradient-shard", "whole-norm"]
)
def test_a_non_finite_loss_stops_both_fsdp_workers_with_one_line(
    tmp_path, digits_dir, capfd, check
):

    from kubetrain.core.errors import KubetrainError

    cfg = load_config(overrides=[*BASE, "train.nproc=2", "train.strategy=fsdp", "train.lr=1e6",
                                 "train.checkpoint_every_steps=1", *check])  # fmt: skip
    with pytest.raises(KubetrainError, match="training failed"):
        LocalLauncher().run(cfg, digits_dir, tmp_path / "model")
    assert_one_train_error_and_no_model(capfd.readouterr().err, tmp_path / "model")
