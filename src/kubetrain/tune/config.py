"""The ``tune`` config section: a Katib-shaped search space and the search's budget.

The algorithm tables are the tune package's knowledge of Katib: which of its algorithm names
have a local (Optuna) equivalent, and which of their ``algorithmSettings`` mean something locally
(``kubetrain.tune.space`` maps them to samplers and pruners).
"""

from __future__ import annotations

import math
from typing import Any, List, Literal  # noqa: UP035 (List: a field is named "list")

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from kubetrain.core.config import Section, set_dotted
from kubetrain.core.errors import ConfigError
from kubetrain.launch.config import JobConfig
from kubetrain.quantize.config import QuantizeConfig

# Katib's algorithm names (https://www.kubeflow.org/docs/components/katib/user-guides/hp-tuning/)
# that have a local equivalent, each with the algorithmSettings that have a local meaning.
ALGORITHM_SETTINGS: dict[str, tuple[str, ...]] = {
    "random": ("random_state",),
    "grid": ("random_state",),
    "tpe": ("random_state", "n_startup_trials", "n_ei_candidates", "n_EI_candidates"),
    "multivariate-tpe": ("random_state", "n_startup_trials", "n_ei_candidates"),
    "cmaes": ("random_state", "sigma", "restart_strategy"),
    "sobol": ("random_state",),
    "bayesianoptimization": ("random_state", "n_initial_points", "base_estimator"),
    "hyperband": ("random_state", "eta", "r_l", "resource_name", "min_resource"),
}
LOCAL_ALGORITHMS = tuple(ALGORITHM_SETTINGS)
# Katib algorithms with no local equivalent: named in the error so the user knows why.
CLUSTER_ONLY_ALGORITHMS = ("enas", "darts", "pbt")


class FeasibleSpace(Section):
    """Katib's ``feasibleSpace``: a range (min/max/step, distribution) or a list."""

    min: float | None = Field(None, description="Lower end of a double/int range.")
    max: float | None = Field(None, description="Upper end of a double/int range.")
    step: float | None = Field(
        None, gt=0, description="Spacing of a range: grid search needs it for doubles."
    )
    list: List[Any] | None = Field(  # noqa: UP006 (a field named "list" shadows the builtin)
        None, description="The values of a categorical or discrete parameter."
    )
    distribution: Literal["uniform", "logUniform"] = Field(
        "uniform", description="How a range is sampled: uniform, or logUniform (min > 0)."
    )


def _range(space: FeasibleSpace) -> tuple[float, float]:
    """(min, max) of a range; both are set (``SearchParameter`` checks it)."""
    if space.min is None or space.max is None:
        raise ValueError("feasibleSpace needs min and max")
    return space.min, space.max


class SearchParameter(Section):
    """One entry of Katib's ``parameters`` list; ``name`` is a dotted config key (``train.lr``)."""

    name: str = Field(description="Dotted config key the parameter sets, e.g. train.lr.")
    parameterType: Literal["double", "int", "categorical", "discrete"] = Field(
        description="Katib's parameterType: double or int ranges, categorical or discrete lists."
    )
    feasibleSpace: FeasibleSpace = Field(description="The values the search may try.")

    @model_validator(mode="after")
    def _space_matches_type(self) -> SearchParameter:
        space = self.feasibleSpace
        if self.parameterType in ("categorical", "discrete"):
            if not space.list:
                raise ValueError(f"{self.parameterType} parameter needs feasibleSpace.list")
        else:
            if space.min is None or space.max is None or space.min >= space.max:
                raise ValueError("feasibleSpace needs min < max")
            if space.distribution == "logUniform" and space.min <= 0:
                raise ValueError("logUniform needs feasibleSpace.min > 0")
        return self

    def grid_values(self) -> list[Any]:
        """The values Katib's grid algorithm would try (a step is needed for doubles)."""
        space = self.feasibleSpace
        if space.list is not None:
            return list(space.list)
        low, high = _range(space)
        if self.parameterType == "int":
            step = int(space.step or 1)
            return list(range(int(low), int(high) + 1, step))
        if space.step is None:
            raise ValueError(
                f"grid search needs feasibleSpace.step for double parameter {self.name}"
            )
        count = math.floor((high - low) / space.step + 1e-9) + 1
        return [round(low + i * space.step, 12) for i in range(count)]

    def bounds(self) -> tuple[float, float]:
        """(min, max) of a range parameter."""
        return _range(self.feasibleSpace)


def _default_search_space() -> list[SearchParameter]:
    return [
        SearchParameter(
            name="train.lr",
            parameterType="double",
            feasibleSpace=FeasibleSpace(min=1e-3, max=1e-2, step=3e-3, distribution="logUniform"),
        ),
        SearchParameter(
            name="train.weight_decay",
            parameterType="categorical",
            feasibleSpace=FeasibleSpace(list=[0.0, 1e-4, 1e-3]),
        ),
    ]


class EarlyStopping(Section):
    """Katib's ``medianstop``: stop a trial below the median of earlier trials at the same step."""

    algorithm: Literal["none", "medianstop"] = Field(
        "none", description="none: every trial runs all its epochs; medianstop: Katib's rule."
    )
    min_trials_required: int = Field(3, ge=1, description="Completed trials before any stop.")
    start_step: int = Field(2, ge=1, description="Epoch from which trials may be stopped.")


class TuneConfig(Section):
    """Hyperparameter search over a Katib-shaped ``parameters`` list."""

    enabled: bool = Field(True, description="Search before training; false: train.* as given.")
    algorithm: str = Field(
        "tpe",
        description="Katib algorithm name: " + ", ".join(LOCAL_ALGORITHMS) + " (locally: "
        "Optuna samplers; hyperband: random sampling + Optuna's HyperbandPruner over epochs).",
    )
    algorithm_settings: dict[str, str | int | float] = Field(
        default_factory=dict,
        description="Katib algorithmSettings that map locally (random_state, n_startup_trials, "
        "n_ei_candidates, n_initial_points, sigma, restart_strategy, eta, r_l, resource_name, "
        "min_resource); any other name is rejected.",
    )
    max_trials: int = Field(8, ge=1, description="Trial budget (Katib maxTrialCount).")
    parallel_trials: int = Field(2, ge=1, le=64, description="Trials at once (parallelTrialCount).")
    max_failed_trials: int = Field(
        3, ge=0, description="Failed trials tolerated (maxFailedTrialCount)."
    )
    trial_epochs: int = Field(
        8, ge=1, description="Epochs per trial (shorter than the final train)."
    )
    trial_nproc: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes per trial; > 1 runs each trial as a DDP job of torchrun workers "
        "(locally a searched train.nproc overrides it; on cluster.backend=kubernetes "
        "train.nproc and train.nnodes cannot be searched).",
    )
    objective_metric: Literal["val_accuracy", "val_loss"] = Field(
        "val_accuracy",
        description="What the search optimises: val_accuracy (maximised) or val_loss (minimised).",
    )
    early_stopping: EarlyStopping = Field(
        default_factory=EarlyStopping, description="Stopping unpromising trials early."
    )
    seed: int = Field(0, description="Seed of the search algorithm.")
    parameters: list[SearchParameter] = Field(
        default_factory=_default_search_space,
        description="The search space: Katib's parameters list over dotted config keys.",
    )

    @property
    def goal(self) -> Literal["maximize", "minimize"]:
        return "maximize" if self.objective_metric == "val_accuracy" else "minimize"

    @property
    def epochs_per_trial(self) -> int:
        """Epochs a trial may train: hyperband's ``r_l`` (its maximum resource) or trial_epochs."""
        if self.algorithm == "hyperband" and "r_l" in self.algorithm_settings:
            return int(self.algorithm_settings["r_l"])
        return self.trial_epochs

    @field_validator("algorithm")
    @classmethod
    def _algorithm_has_local_equivalent(cls, algo: str) -> str:
        supported = ", ".join(LOCAL_ALGORITHMS)
        if algo in CLUSTER_ONLY_ALGORITHMS:
            raise ValueError(
                f"Katib algorithm '{algo}' has no local equivalent; locally supported: {supported}"
            )
        if algo not in LOCAL_ALGORITHMS:
            raise ValueError(f"unknown algorithm '{algo}'; locally supported: {supported}")
        return algo

    @field_validator("parameters")
    @classmethod
    def _space_not_empty(
        cls, parameters: list[SearchParameter], info: ValidationInfo
    ) -> list[SearchParameter]:
        # Katib refuses an Experiment without parameters; locally it would run max_trials
        # identical trials. Training without a search is tune.enabled=false.
        if not parameters and info.data.get("enabled", True):
            raise ValueError(
                "an empty search space; add parameters, or set tune.enabled=false to train "
                "without a search"
            )
        return parameters

    @model_validator(mode="after")
    def _settings_map(self) -> TuneConfig:
        algo = self.algorithm
        known = ALGORITHM_SETTINGS[algo]
        for name in self.algorithm_settings:
            if name not in known:
                raise ValueError(
                    f"algorithm_settings.{name}: not a setting of '{algo}' here "
                    f"(accepted: {', '.join(known)})"
                )
        if algo == "hyperband" and self.early_stopping.algorithm != "none":
            raise ValueError(
                "hyperband stops trials itself; set early_stopping.algorithm=none with it"
            )
        resource = self.algorithm_settings.get("resource_name")
        if algo == "hyperband" and resource not in (None, "epochs", "train.epochs"):
            raise ValueError(
                f"algorithm_settings.resource_name: '{resource}': locally the hyperband "
                "resource is the trial's epochs (use train.epochs)"
            )
        return self


# A trial's process count on a cluster: Katib's trial template is one PyTorchJob built with
# tune.trial_nproc processes on one node, so a searched value would contradict it.
CLUSTER_FIXED_KEYS = ("train.nproc", "train.nnodes")


def check_searchable_on(backend: str, tune: TuneConfig) -> None:
    """Refuse a search space that ``backend`` cannot run.

    Args:
        backend: ``cluster.backend`` (``"local"`` or ``"kubernetes"``).
        tune: the search settings.

    Raises:
        ValueError: on ``kubernetes``, ``tune.parameters`` searches ``train.nproc`` or
            ``train.nnodes`` (one line, naming the entry).
    """
    if backend != "kubernetes" or not tune.enabled:
        return
    for i, param in enumerate(tune.parameters):
        if param.name in CLUSTER_FIXED_KEYS:
            raise ValueError(
                f"tune.parameters.{i}.name: '{param.name}' cannot be searched with "
                "cluster.backend=kubernetes (each Katib trial runs tune.trial_nproc processes "
                "on one node); set tune.trial_nproc instead"
            )


def objective_name(tune: TuneConfig, kind: str) -> str:
    """What the search objective is for a dataset of ``kind``: ``val_loss``, or ``val_<metric>``
    with the metric the kind's task validates on (``val_accuracy`` is the key trials report it
    under, whatever the metric: accuracy for classification, the task's own for other kinds)."""
    from kubetrain.tasks import KINDS, metric_of

    if tune.objective_metric == "val_loss":
        return "val_loss"
    if kind not in KINDS:
        return tune.objective_metric
    return f"val_{metric_of(kind)}"


# The sections a search parameter may name (a trial trains with them set).
SEARCHABLE_SECTIONS = ("data", "model", "train", "quantize")


class SearchConfig(JobConfig):
    """What the search reads: the training run, where it runs, the search (``tune``) and the
    ``quantize`` section its parameters may name."""

    tune: TuneConfig = Field(default_factory=TuneConfig, description=TuneConfig.__doc__)
    quantize: QuantizeConfig = Field(
        default_factory=QuantizeConfig, description=QuantizeConfig.__doc__
    )

    @model_validator(mode="after")
    def _search_space_names_config(self) -> SearchConfig:
        dumped = self.model_dump()
        for i, param in enumerate(self.tune.parameters):
            where = f"tune.parameters.{i}.name"
            section = param.name.split(".")[0]
            if section not in SEARCHABLE_SECTIONS or "." not in param.name:
                raise ValueError(
                    f"{where}: '{param.name}' must name a field of data, model, train "
                    "or quantize (e.g. train.lr)"
                )
            try:
                set_dotted(dumped, param.name, _sample_value(param))
            except ConfigError:
                raise ValueError(f"{where}: '{param.name}' is not a config field") from None
            try:
                type(getattr(self, section)).model_validate(dumped[section])
            except ValidationError as err:
                raise ValueError(f"{where}: '{param.name}': {err.errors()[0]['msg']}") from None
        check_searchable_on(self.cluster.backend, self.tune)
        if self.tune.enabled and self.tune.algorithm == "grid":
            for param in self.tune.parameters:
                param.grid_values()
        return self


def _sample_value(param: SearchParameter) -> Any:
    space = param.feasibleSpace
    if space.list:
        return space.list[0]
    low = param.bounds()[0]
    return int(low) if param.parameterType == "int" else low
