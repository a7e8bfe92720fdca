"""Katib search-space spec -> Optuna distributions and samplers (same algorithm names as Katib)."""

from __future__ import annotations

from typing import Any

import optuna

from kubetrain.core.errors import ConfigError
from kubetrain.tune.config import SearchParameter, TuneConfig


def distribution(param: SearchParameter, algorithm: str) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of one Katib parameter (grid: exactly the grid's values)."""
    space = param.feasibleSpace
    if algorithm == "grid":
        return optuna.distributions.CategoricalDistribution(param.grid_values())
    if param.parameterType in ("categorical", "discrete"):
        return optuna.distributions.CategoricalDistribution(list(space.list or []))
    log = space.distribution == "logUniform"
    low, high = param.bounds()
    if param.parameterType == "int":
        return optuna.distributions.IntDistribution(
            int(low), int(high), log=log, step=1 if log else int(space.step or 1)
        )
    # Optuna cannot combine log and step; a log-uniform double is sampled continuously.
    return optuna.distributions.FloatDistribution(
        low, high, log=log, step=None if log else space.step
    )


def search_space(tune: TuneConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    return {p.name: distribution(p, tune.algorithm) for p in tune.parameters}


def grid_size(tune: TuneConfig) -> int:
    size = 1
    for p in tune.parameters:
        size *= len(p.grid_values())
    return size


def _int_setting(settings: dict[str, Any], *names: str) -> int | None:
    for name in names:
        if name in settings:
            try:
                return int(settings[name])
            except (TypeError, ValueError):
                raise ConfigError(
                    f"config error: tune.algorithm_settings.{name}: expected an integer "
                    f"(got {settings[name]!r})"
                ) from None
    return None


def make_sampler(tune: TuneConfig) -> optuna.samplers.BaseSampler:
    """Map a Katib algorithm name and its settings to an Optuna sampler."""
    settings = dict(tune.algorithm_settings)
    seed = _int_setting(settings, "random_state") or tune.seed
    startup = _int_setting(settings, "n_startup_trials", "n_initial_points")
    algo = tune.algorithm
    # Katib's hyperband samples each bracket's configurations at random.
    if algo in ("random", "hyperband"):
        return optuna.samplers.RandomSampler(seed=seed)
    if algo == "grid":
        grid = {p.name: p.grid_values() for p in tune.parameters}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if algo in ("tpe", "multivariate-tpe"):
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=startup if startup is not None else 3,
            n_ei_candidates=_int_setting(settings, "n_ei_candidates", "n_EI_candidates") or 24,
            multivariate=algo == "multivariate-tpe",
            constant_liar=tune.parallel_trials > 1,
        )
    if algo == "cmaes":
        sigma = settings.get("sigma")
        return optuna.samplers.CmaEsSampler(
            seed=seed,
            sigma0=float(sigma) if sigma is not None else None,
            restart_strategy=_text(settings.get("restart_strategy")),
            warn_independent_sampling=False,
        )
    if algo == "sobol":
        # Like CMA-ES it samples numbers only; categoricals come from its random sampler.
        return optuna.samplers.QMCSampler(
            qmc_type="sobol", scramble=True, seed=seed, warn_independent_sampling=False
        )
    if algo == "bayesianoptimization":
        estimator = str(settings.get("base_estimator", "GP"))
        if estimator != "GP":
            raise ConfigError(
                f"config error: tune.algorithm_settings.base_estimator: '{estimator}': locally "
                "bayesianoptimization is a Gaussian process (GP) only"
            )
        return optuna.samplers.GPSampler(
            seed=seed, n_startup_trials=startup if startup is not None else 3
        )
    raise ConfigError(f"config error: tune.algorithm: no local equivalent for {algo!r}")


def make_pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    """Katib's medianstop (stop a trial whose best result so far is below the median of the
    completed trials at the same epoch, once ``min_trials_required`` trials completed and from
    epoch ``start_step``), or hyperband's successive halving over epochs (``eta``, ``r_l``)."""
    if tune.algorithm == "hyperband":
        settings = tune.algorithm_settings
        return optuna.pruners.HyperbandPruner(
            min_resource=_int_setting(settings, "min_resource") or 1,
            # Explicit: "auto" would be inferred separately in every trial process.
            max_resource=tune.epochs_per_trial,
            reduction_factor=_int_setting(settings, "eta") or 3,
        )
    es = tune.early_stopping
    if es.algorithm == "medianstop":
        return optuna.pruners.MedianPruner(
            n_startup_trials=es.min_trials_required, n_warmup_steps=es.start_step
        )
    return optuna.pruners.NopPruner()


def _text(value: object) -> str | None:
    """A setting that names something (``restart_strategy``), as text."""
    return None if value is None else str(value)
