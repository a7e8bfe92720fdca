"""Searches that need more than one process per trial or a killed search: real torchrun
workers, a real SIGKILL of a running `kubetrain tune`."""

from __future__ import annotations

import optuna
import pytest

from kubetrain.core.io import read_json
from kubetrain.pipeline.config import load_config
from kubetrain.tune.local import run_search

FAST = ["tune.trial_epochs=2", "tune.parallel_trials=2", "train.epochs=2"]


def test_a_trial_can_be_a_ddp_job(tmp_path, digits_dir):
    cfg = load_config(
        overrides=[*FAST, "tune.max_trials=2", "tune.parallel_trials=1", "tune.trial_nproc=2"]
    )
    result = run_search(cfg, digits_dir, tmp_path)
    trials = read_json(tmp_path / "trials.json")
    assert result.trials_complete == 2
    assert [t["world_size"] for t in trials] == [2, 2]
    assert all(len(t["curve"]) == 2 and t["value"] > 0.5 for t in trials)


def test_interrupted_search_resumes_without_redoing_finished_trials(tmp_path, digits_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    from kubetrain.tune.study import STUDY_NAME, storage

    sets = [*FAST, "tune.max_trials=5", "tune.parallel_trials=1", "tune.trial_epochs=3"]
    args = [a for s in sets for a in ("--set", s)]
    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "kubetrain.cli", "tune", "--dataset", str(digits_dir)]
    proc = subprocess.Popen(
        [*cmd, "--output", str(out), *args], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    done: list = []
    deadline = time.monotonic() + 180
    while len(done) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if (out / "study.journal").exists():
            study = optuna.load_study(study_name=STUDY_NAME, storage=storage(out / "study.journal"))
            done = [t for t in study.trials if t.state.is_finished()]
    os.killpg(proc.pid, signal.SIGKILL)  # the whole search, its trial processes included
    proc.wait()
    assert len(done) >= 2, "the search did not finish two trials in time"
    before = {t.number: t.value for t in done}

    cfg = load_config(overrides=sets)
    result = run_search(cfg, digits_dir, out)
    trials = read_json(out / "trials.json")
    assert result.trials_total == 5 == len(trials)  # finished ones count, none redone
    for number, value in before.items():
        assert next(t for t in trials if t["number"] == number)["value"] == value
    assert result.trials_interrupted <= 1


# Learning rates from hopeless to good: some trials are clearly worse, so pruners have work.
WIDE_LR = (
    "tune.parameters=[{name: train.lr, parameterType: double, "
    "feasibleSpace: {min: 0.00001, max: 0.01, distribution: logUniform}}]"
)


@pytest.mark.parametrize(
    "overrides",
    [
        ["tune.algorithm=hyperband", "tune.algorithm_settings={eta: 2, r_l: 4}"],
        [
            "tune.algorithm=random",
            "tune.early_stopping.algorithm=medianstop",
            "tune.early_stopping.min_trials_required=2",
            "tune.early_stopping.start_step=1",
            "tune.trial_epochs=4",
        ],
    ],
    ids=["hyperband", "medianstop"],
)
def test_early_stopping_prunes_trials_from_their_epoch_reports(tmp_path, digits_dir, overrides):
    # One trial at a time: which trials a pruner stops then depends on the seeds, not on timing.
    cfg = load_config(
        overrides=[*FAST, "tune.max_trials=8", "tune.parallel_trials=1", WIDE_LR, *overrides]
    )
    result = run_search(cfg, digits_dir, tmp_path)
    trials = read_json(tmp_path / "trials.json")
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert result.trials_pruned == len(pruned) >= 1
    assert all(len(t["curve"]) < 4 for t in pruned)
    assert result.trial_epochs_total < 8 * 4  # epochs saved
    best = max((t for t in trials if t["state"] == "complete"), key=lambda t: t["value"])
    assert best["value"] == result.best_value > 0.8


def test_a_killed_trial_process_is_one_line_not_a_traceback(tmp_path, digits_dir):
    from kubetrain.core.errors import KubetrainError

    cfg = load_config(
        overrides=[
            *FAST,
            "tune.max_trials=1",
            "tune.parallel_trials=1",
            "model.name=vision_factory:dies",
        ]
    )
    with pytest.raises(KubetrainError, match=r"tune: a trial process died \(trial 0, params"):
        run_search(cfg, digits_dir, tmp_path)
