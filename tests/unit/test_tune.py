from __future__ import annotations

import optuna
import pytest

from kubetrain.core.errors import ConfigError
from kubetrain.core.io import read_json
from kubetrain.pipeline.config import load_config
from kubetrain.tune.config import LOCAL_ALGORITHMS
from kubetrain.tune.local import run_search
from kubetrain.tune.space import grid_size, make_pruner, make_sampler, search_space
from tests.conftest import run_cli

FAST = ["tune.trial_epochs=2", "tune.parallel_trials=2", "train.epochs=2"]


@pytest.mark.parametrize("algorithm", LOCAL_ALGORITHMS)
def test_every_katib_name_maps_to_a_sampler(algorithm):
    cfg = load_config(overrides=[f"tune.algorithm={algorithm}"])
    sampler = make_sampler(cfg.tune)
    assert isinstance(sampler, optuna.samplers.BaseSampler)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    trial = study.ask(search_space(cfg.tune))  # the sampler accepts the declared space
    assert set(trial.params) == {"train.lr", "train.weight_decay"}
    assert 1e-3 <= trial.params["train.lr"] <= 1e-2


def test_space_types_follow_katib():
    cfg = load_config(
        overrides=[
            "tune.parameters=[{name: train.epochs, parameterType: int, feasibleSpace: "
            "{min: 2, max: 8, step: 2}}, {name: train.optimizer, parameterType: categorical, "
            "feasibleSpace: {list: [adam, sgd]}}, {name: train.lr, parameterType: double, "
            "feasibleSpace: {min: 0.0001, max: 0.1, distribution: logUniform}}]"
        ]
    )
    dists = search_space(cfg.tune)
    assert dists["train.epochs"] == optuna.distributions.IntDistribution(2, 8, step=2)
    assert dists["train.optimizer"].choices == ("adam", "sgd")
    assert dists["train.lr"].log is True
    assert grid_size(load_config().tune) == 12


def test_medianstop_maps_katib_settings():
    cfg = load_config(
        overrides=[
            "tune.early_stopping.algorithm=medianstop",
            "tune.early_stopping.min_trials_required=4",
            "tune.early_stopping.start_step=3",
        ]
    )
    pruner = make_pruner(cfg.tune)
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (4, 3)


def test_search_runs_trials_in_processes_and_writes_the_best_and_a_report(tmp_path, digits_dir):
    cfg = load_config(overrides=[*FAST, "tune.max_trials=4", "tune.algorithm=random"])
    result = run_search(cfg, digits_dir, tmp_path)
    assert result.trials_total == 4 and result.trials_complete == 4
    assert result.best_value > 0.8
    saved = read_json(tmp_path / "best_params.json")
    assert saved["best_params"] == result.best_params
    trials = read_json(tmp_path / "trials.json")
    assert len(trials) == 4 and all(len(t["curve"]) == 2 for t in trials)
    best = max(trials, key=lambda t: t["value"])
    assert best["params"] == result.best_params
    assert (tmp_path / "study.journal").stat().st_size > 0
    assert set(result.param_importance) == {"train.lr", "train.weight_decay"}
    assert abs(sum(result.param_importance.values()) - 1) < 1e-6
    report = (tmp_path / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 2 and "parameter importance" in report


def test_grid_is_capped_at_its_size_and_resumes(tmp_path, digits_dir):
    cfg = load_config(
        overrides=[
            *FAST,
            "tune.algorithm=grid",
            "tune.max_trials=50",
            "tune.parallel_trials=1",
            "tune.trial_epochs=1",
            "tune.parameters.1.feasibleSpace.list=[0.0]",
        ]
    )
    first = run_search(cfg, digits_dir, tmp_path)
    assert first.trials_total == 4  # 4 learning rates x 1 weight decay
    tried = sorted(t["params"]["train.lr"] for t in read_json(tmp_path / "trials.json"))
    assert tried == [0.001, 0.004, 0.007, 0.01]
    again = run_search(cfg, digits_dir, tmp_path)  # the study persists: nothing is redone
    assert again.trials_total == 4


def test_failed_trials_are_recorded_not_fatal(tmp_path, digits_dir):
    # batch 63 cannot be split evenly -> that trial fails; the search goes on.
    cfg = load_config(
        overrides=[
            *FAST,
            "tune.algorithm=grid",
            "tune.max_trials=10",
            "tune.parallel_trials=1",
            "tune.trial_epochs=1",
            "tune.parameters=[{name: train.batch_size, parameterType: categorical, "
            "feasibleSpace: {list: [64, 4096]}}]",
        ]
    )
    result = run_search(cfg, digits_dir, tmp_path)
    assert result.trials_failed == 1 and result.trials_complete == 1
    failed = [t for t in read_json(tmp_path / "trials.json") if t["state"] == "fail"]
    assert "exceeds the 1257 training samples" in failed[0]["error"]
    assert result.best_params == {"train.batch_size": 64}


def test_too_many_failures_stop_the_search(tmp_path, digits_dir):
    from kubetrain.core.errors import KubetrainError

    cfg = load_config(
        overrides=[
            *FAST,
            "tune.max_failed_trials=0",
            "tune.max_trials=1",
            "tune.parameters=[{name: train.batch_size, parameterType: categorical, "
            "feasibleSpace: {list: [4096]}}]",
        ]
    )
    with pytest.raises(KubetrainError, match=r"tuning failed: \d trials failed .*exceeds the 1257"):
        run_search(cfg, digits_dir, tmp_path)


@pytest.mark.parametrize(
    "name,message",
    [
        ("enas", "Katib algorithm 'enas' has no local equivalent; locally supported: random, "),
        ("darts", "Katib algorithm .darts. has no local equivalent"),
        ("annealing", "unknown algorithm 'annealing'; locally supported: random, grid, tpe, "),
    ],
    ids=["enas", "darts", "unknown"],
)
def test_algorithm_without_local_equivalent_is_one_clear_line(name, message):
    with pytest.raises(ConfigError, match="tune.algorithm: " + message):
        load_config(overrides=[f"tune.algorithm={name}"])
    proc = run_cli("config", "show", "--set", f"tune.algorithm={name}")
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "hyperband" in proc.stderr


def test_algorithm_settings_map_or_are_rejected():
    with pytest.raises(ConfigError, match=r"algorithm_settings.n_trees: not a setting of 'tpe'"):
        load_config(overrides=["tune.algorithm_settings={n_trees: 3}"])
    cfg = load_config(overrides=["tune.algorithm_settings={n_startup_trials: 5, random_state: 7}"])
    sampler = make_sampler(cfg.tune)
    assert sampler._n_startup_trials == 5
    with pytest.raises(ConfigError, match="hyperband stops trials itself"):
        load_config(
            overrides=["tune.algorithm=hyperband", "tune.early_stopping.algorithm=medianstop"]
        )


def test_hyperband_maps_katib_settings():
    cfg = load_config(
        overrides=["tune.algorithm=hyperband", "tune.algorithm_settings={eta: 2, r_l: 6}"]
    )
    pruner = make_pruner(cfg.tune)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (1, 6, 2)
    assert isinstance(make_sampler(cfg.tune), optuna.samplers.RandomSampler)
    assert cfg.tune.epochs_per_trial == 6


@pytest.mark.parametrize(
    ("cores", "settings", "expected"),
    [
        (2, ["tune.parallel_trials=2", "tune.trial_nproc=1"], 2),
        (2, ["tune.parallel_trials=4", "tune.trial_nproc=1"], 2),
        (4, ["tune.parallel_trials=4", "tune.trial_nproc=2"], 2),
        (2, ["tune.parallel_trials=2", "tune.max_trials=1"], 1),
    ],
    ids=["fits", "capped-to-cores", "capped-by-ddp-trials", "capped-by-budget"],
)
def test_trials_at_once_stay_within_the_cores(monkeypatch, caplog, cores, settings, expected):
    from kubetrain.launch import local as launch_local
    from kubetrain.tune.local import _trials_at_once

    monkeypatch.setattr(launch_local, "cpu_cores", lambda: cores)
    tune = load_config(overrides=settings).tune
    assert _trials_at_once(tune, tune.max_trials) == expected
    capped = "exceed the" in caplog.text
    assert capped == (expected < min(tune.parallel_trials, tune.max_trials))


def test_a_trial_with_more_processes_than_cores_is_refused(monkeypatch):
    from kubetrain.launch import local as launch_local
    from kubetrain.tune.local import _trials_at_once

    monkeypatch.setattr(launch_local, "cpu_cores", lambda: 2)
    tune = load_config(overrides=["tune.trial_nproc=4"]).tune
    with pytest.raises(ConfigError, match=r"tune.trial_nproc: 4 processes per trial, but .* 2 CPU"):
        _trials_at_once(tune, 8)
