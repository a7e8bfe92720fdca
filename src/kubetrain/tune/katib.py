"""Search on a cluster: a Katib ``Experiment`` (kubeflow.org/v1beta1) whose trials are training
jobs of the kind training uses (``cluster.training_api``: TrainJob, which needs Katib v0.19+, or
PyTorchJob), each labelled for ``cluster.queue_name`` like the train job.

``build_experiment`` is a pure function built with ``kubeflow-katib-api``'s models from the same
``TuneConfig`` the local Optuna engine reads: same algorithm names and settings, same budget,
same ``medianstop``, same trial semantics (``tune.trial_epochs`` epochs, ``tune.trial_nproc``
processes on one node, see ``kubetrain.tune.local.trial_config``), same objective (the *last*
epoch's value). Unlike locally, a trial's process count cannot be searched here: the trial
template fixes it, so ``SearchConfig`` refuses ``train.nproc``/``train.nnodes`` in
``tune.parameters`` on this backend.

Katib parameter names cannot carry the dots of config keys, so ``train.lr`` is searched as
``train-lr`` (config fields never contain ``-``) and mapped back in ``best_params``. Each trial
runs ``kubetrain.launch.worker --set train.lr=${trialParameters.train-lr} ...``; the worker prints
one metrics line per epoch (``kubetrain.launch.worker.metrics_line``) that ``METRICS_FILTER``
parses in Katib's StdOut collector.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from kubetrain.core.config import parse_override
from kubetrain.core.errors import KubetrainError
from kubetrain.core.records import SearchSummary, Trial
from kubetrain.launch.cluster import ClusterJob, JobPaths, condition, new_name, run_job
from kubetrain.launch.jobkinds import JobKind, offline_kind, resolve_kind
from kubetrain.launch.kubeapi import KubeApi, Resource
from kubetrain.tasks import kind_of
from kubetrain.tune.config import SearchConfig, SearchParameter, TuneConfig, objective_name

log = logging.getLogger(__name__)

EXPERIMENT = Resource("kubeflow.org", "v1beta1", "experiments", "Experiment")
TRIAL = Resource("kubeflow.org", "v1beta1", "trials", "Trial")
EXPERIMENT_LABEL = "katib.kubeflow.org/experiment"
# name=value pairs of the worker's metrics line; Katib keeps those whose name is a metric.
# Group 1 is the name, group 2 the value (RE2 and Python's re read it the same way).
METRICS_FILTER = r"([a-z_]+)=([-+]?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
# Katib algorithms whose suggestion service takes a random_state setting.
SEEDED_ALGORITHMS = ("random", "tpe", "multivariate-tpe", "cmaes", "bayesianoptimization")
OTHER_METRIC = {"val_accuracy": "val_loss", "val_loss": "val_accuracy"}


def katib_name(key: str) -> str:
    """Config key -> Katib parameter name: ``train.lr`` -> ``train-lr``."""
    return key.replace(".", "-")


def config_key(name: str) -> str:
    """Katib parameter name -> config key: ``train-lr`` -> ``train.lr``."""
    return name.replace("-", ".")


def parse_metrics(text: str, names: tuple[str, ...] | list[str]) -> list[tuple[str, float]]:
    """What Katib's StdOut collector keeps from ``text``: (metric, value) in order of appearance.

    Mirrors its text parser: a line is read only if it mentions a metric name, every match of
    ``METRICS_FILTER`` in it is a (name, value) pair, and only names in ``names`` are kept.
    """
    pattern = re.compile(METRICS_FILTER)
    found = []
    for line in text.splitlines():
        if not any(n in line for n in names):
            continue
        for name, value in pattern.findall(line):
            if name.strip() in names:
                found.append((name.strip(), float(value)))
    return found


def _number(value: float | None, integer: bool) -> str | None:
    if value is None:
        return None
    return str(int(value)) if integer else repr(float(value))


def _parameter(param: SearchParameter, grid: bool) -> Any:
    from kubeflow_katib_api import models

    space = param.feasibleSpace
    integer = param.parameterType == "int"
    if space.list is not None:
        feasible = models.V1beta1FeasibleSpace(list=[str(v) for v in space.list])
    else:
        step = space.step if space.step is not None else (1 if integer and grid else None)
        if space.distribution == "logUniform" and not grid:
            step = None  # as the local engine: a log-uniform range is sampled continuously
        feasible = models.V1beta1FeasibleSpace(
            min=_number(space.min, integer),
            max=_number(space.max, integer),
            step=_number(step, integer),
            distribution=space.distribution,
        )
    return models.V1beta1ParameterSpec(
        name=katib_name(param.name), parameter_type=param.parameterType, feasible_space=feasible
    )


def trial_config(cfg: SearchConfig) -> SearchConfig:
    """A trial's config: the local engine's rule (``tune.trial_epochs`` epochs,
    ``tune.trial_nproc`` processes on one node); the searched parameters come later, as
    ``--set`` overrides of each trial's command."""
    from kubetrain.tune.local import trial_config as local_trial_config

    return local_trial_config(cfg, {})


def build_experiment(
    cfg: SearchConfig, name: str, dataset_dir: str | None = None, kind: JobKind | None = None
) -> dict:
    """The Katib Experiment for ``cfg.tune``, as the dict sent to the API server.

    Args:
        cfg: the pipeline config.
        name: the Experiment's name.
        dataset_dir: the dataset's path on the shared claim (default:
            ``JobPaths.for_job(cfg, name).dataset``).
        kind: the trials' job kind (default: ``cluster.training_api``, TrainJob for ``auto``,
            as ``kubetrain manifests`` renders it).

    Raises:
        KubetrainError: no image is set; ConfigError: the trial job cannot serve the config.
    """
    from kubeflow_katib_api import models

    tune = cfg.tune
    kind = kind or offline_kind(cfg)
    spec = models.V1beta1ExperimentSpec(
        objective=_objective(tune),
        algorithm=_algorithm(tune),
        early_stopping=_early_stopping(cfg),
        parallel_trial_count=tune.parallel_trials,
        max_trial_count=_max_trials(tune),
        max_failed_trial_count=tune.max_failed_trials,
        parameters=[_parameter(p, tune.algorithm == "grid") for p in tune.parameters],
        metrics_collector_spec=models.V1beta1MetricsCollectorSpec(
            collector=models.V1beta1CollectorSpec(kind="StdOut"),
            source=models.V1beta1SourceSpec(
                filter=models.V1beta1FilterSpec(metrics_format=[METRICS_FILTER])
            ),
        ),
        trial_template=_trial_template(cfg, name, dataset_dir, kind),
    )
    experiment = models.V1beta1Experiment(
        api_version=f"{EXPERIMENT.group}/{EXPERIMENT.version}",
        kind=EXPERIMENT.kind,
        metadata=models.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name,
            namespace=cfg.cluster.namespace,
            labels={"app.kubernetes.io/name": "kubetrain", "app.kubernetes.io/component": "tune"},
        ),
        spec=spec,
    )
    return experiment.to_dict()


def _objective(tune: TuneConfig) -> Any:
    """The objective, and the other metric collected beside it; both scored by their last
    epoch ("latest"), as the local engine scores a trial."""
    from kubeflow_katib_api import models

    metric = tune.objective_metric
    return models.V1beta1ObjectiveSpec(
        type=tune.goal,
        objective_metric_name=metric,
        additional_metric_names=[OTHER_METRIC[metric]],
        metric_strategies=[
            models.V1beta1MetricStrategy(name=m, value="latest")
            for m in (metric, OTHER_METRIC[metric])
        ],
    )


def _algorithm(tune: TuneConfig) -> Any:
    """The algorithm and its settings (seeded with ``tune.seed`` where Katib takes a seed)."""
    from kubeflow_katib_api import models

    settings = dict(tune.algorithm_settings)
    if tune.algorithm in SEEDED_ALGORITHMS:
        settings.setdefault("random_state", tune.seed)
    return models.V1beta1AlgorithmSpec(
        algorithm_name=tune.algorithm,
        algorithm_settings=[
            models.V1beta1AlgorithmSetting(name=k, value=str(v))
            for k, v in sorted(settings.items())
        ]
        or None,
    )


def _max_trials(tune: TuneConfig) -> int:
    """``tune.max_trials``, at most the grid's size for ``grid``."""
    if tune.algorithm != "grid":
        return tune.max_trials
    from kubetrain.tune.space import grid_size

    return min(tune.max_trials, grid_size(tune))


def _trial_template(cfg: SearchConfig, name: str, dataset_dir: str | None, kind: JobKind) -> Any:
    """What each trial runs: the job of ``kind`` whose worker gets the trial's parameters as
    ``--set`` overrides, and how Katib reads its outcome."""
    from kubeflow_katib_api import models

    tune = cfg.tune
    dataset = dataset_dir or JobPaths.for_job(cfg, name).dataset
    trial_cfg = trial_config(cfg)
    overrides = [f"{p.name}=${{trialParameters.{katib_name(p.name)}}}" for p in tune.parameters]
    # A trial's model is not kept: the final train step retrains with the best parameters.
    command = kind.worker_command(trial_cfg, dataset, "/tmp/kubetrain-trial", overrides)
    job = kind.build_trial(trial_cfg, name, command)
    # Katib names each trial's job; its labels (Kueue's queue among them) stay.
    trial_spec = {k: v for k, v in job.items() if k != "metadata"}
    trial_spec["metadata"] = {"labels": job["metadata"]["labels"]}
    return models.V1beta1TrialTemplate(
        primary_container_name=kind.container,
        primary_pod_labels=dict(kind.trial_primary_pod_labels),
        success_condition=kind.trial_success,
        failure_condition=kind.trial_failure,
        trial_parameters=[
            models.V1beta1TrialParameterSpec(
                name=katib_name(p.name), reference=katib_name(p.name), description=p.name
            )
            for p in tune.parameters
        ],
        trial_spec=trial_spec,
    )


def _early_stopping(cfg: SearchConfig) -> Any:
    from kubeflow_katib_api import models

    es = cfg.tune.early_stopping
    if es.algorithm == "none":
        return None
    return models.V1beta1EarlyStoppingSpec(
        algorithm_name=es.algorithm,
        algorithm_settings=[
            models.V1beta1EarlyStoppingSetting(
                name="min_trials_required", value=str(es.min_trials_required)
            ),
            models.V1beta1EarlyStoppingSetting(name="start_step", value=str(es.start_step)),
        ],
    )


# -- results ------------------------------------------------------------------------------


def _metric_value(observation: dict[str, Any] | None, metric: str) -> float | None:
    for m in (observation or {}).get("metrics") or []:
        if m.get("name") == metric:
            try:
                return float(m.get("latest"))
            except (TypeError, ValueError):  # "unavailable"
                return None
    return None


def _params(assignments: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {config_key(a["name"]): parse_override(f"x={a['value']}")[1] for a in assignments or []}


TRIAL_STATES = {
    "Succeeded": "complete",
    "EarlyStopped": "pruned",
    "Failed": "fail",
    "MetricsUnavailable": "fail",
    "Killed": "fail",
}


def trial_records(trials: list[dict[str, Any]], metric: str) -> list[Trial]:
    """Trial CRs -> the records the local engine writes to trials.json (oldest first)."""
    ordered = sorted(trials, key=lambda t: t["metadata"].get("creationTimestamp") or "")
    records = []
    for number, trial in enumerate(ordered):
        kind, text = condition(trial, *TRIAL_STATES)
        records.append(
            Trial(
                number=number,
                name=trial["metadata"]["name"],
                state=TRIAL_STATES.get(kind or "", "running"),
                value=_metric_value((trial.get("status") or {}).get("observation"), metric),
                params=_params((trial.get("spec") or {}).get("parameterAssignments")),
                error=text if kind in ("Failed", "MetricsUnavailable", "Killed") else None,
            )
        )
    return records


def search_result(
    cfg: SearchConfig, experiment: dict[str, Any], records: list[Trial], training_api: str
) -> SearchSummary:
    """best_params.json of a finished Experiment (the local engine's record)."""
    tune = cfg.tune
    optimal = (experiment.get("status") or {}).get("currentOptimalTrial") or {}
    best_params = _params(optimal.get("parameterAssignments"))
    name = experiment["metadata"]["name"]
    if not best_params:
        raise KubetrainError(f"tuning failed: experiment {name} has no optimal trial")
    cfg.with_params(best_params)  # the parameters must make a valid config
    best_value = _metric_value(optimal.get("observation"), tune.objective_metric)
    if best_value is None:
        raise KubetrainError(
            f"tuning failed: the best trial of experiment {name} reported no "
            f"{tune.objective_metric} (does the trial log print it?)"
        )
    best_name = optimal.get("bestTrialName")
    best_number = next((r.number for r in records if r.name == best_name), None)
    return SearchSummary(
        enabled=True,
        engine="katib",
        experiment=f"{cfg.cluster.namespace}/{name}",
        training_api=training_api,
        algorithm=tune.algorithm,
        metric=tune.objective_metric,
        objective=objective_name(tune, kind_of(cfg.data)),
        goal=tune.goal,
        best_params=best_params,
        best_value=best_value,
        best_trial=best_number,
        trials_total=len(records),
        trials_complete=sum(r.state == "complete" for r in records),
        trials_pruned=sum(r.state == "pruned" for r in records),
        trials_failed=sum(r.state == "fail" for r in records),
    )


class ExperimentWatcher:
    """The lifecycle's ``Watcher`` for a Katib Experiment: logs trial progress as it changes."""

    resource = EXPERIMENT
    success = "Succeeded"

    def __init__(self) -> None:
        self.seen: tuple[int, int, int] | None = None

    def suspended(self, obj: dict[str, Any]) -> bool:
        """Never: Kueue holds the trials' jobs, not the Experiment."""
        return False

    def observe(self, api: KubeApi, obj: dict[str, Any]) -> None:
        """Log "N trial(s) done, R running, F failed" whenever those counts change."""
        status = obj.get("status") or {}
        done = sum(status.get(k) or 0 for k in ("trialsSucceeded", "trialsEarlyStopped"))
        counts = (done, status.get("trialsRunning") or 0, status.get("trialsFailed") or 0)
        if counts != self.seen:
            self.seen = counts
            where = EXPERIMENT.describe(api.namespace, obj["metadata"]["name"])
            log.info("%s: %d trial(s) done, %d running, %d failed", where, *counts)

    def explain(self, what: str, reason: str) -> str:
        """``"<what> failed: <Katib's reason>"`` (e.g. too many failed trials)."""
        return f"{what} failed: {reason}"

    def close(self) -> None:
        """Nothing to stop: trial logs are Katib's collector's to read."""


def run_experiment(
    cfg: SearchConfig, dataset_dir: Path, out_dir: Path, api: KubeApi | None = None
) -> SearchSummary:
    """The tune step on ``kubernetes``: the search artifact (``SearchResult``) in ``out_dir``.

    The dataset travels through the shared claim like a PyTorchJob's (``JobPaths``).

    Returns:
        The search result (best_params.json's fields, as the local engine writes them).

    Raises:
        KubetrainError: no image, the claim or namespace is missing, the API refused the
            Experiment, Katib failed it, or its best trial reported no metric.
    """
    from kubetrain.launch.cluster import check_claim

    name = new_name(cfg, "tune")
    build_experiment(cfg, name)  # what is wrong with the config fails first
    check_claim(cfg, EXPERIMENT.kind)
    api = api or KubeApi(cfg.cluster.namespace)
    api.check_namespace()  # a missing namespace says so before anything else is asked
    kind = resolve_kind(cfg, api)
    experiment = build_experiment(cfg, name, JobPaths.for_job(cfg, name).dataset, kind)

    def collect(
        run: ClusterJob, exp: dict[str, Any], _paths: JobPaths
    ) -> tuple[list[Trial], SearchSummary]:
        trials = api.list(TRIAL, f"{EXPERIMENT_LABEL}={name}")
        records = trial_records(trials, cfg.tune.objective_metric)
        return records, search_result(cfg, exp, records, kind.api)

    from kubetrain.core.artifacts import SearchResult

    records, result = run_job(cfg, api, ExperimentWatcher(), experiment, dataset_dir, collect)
    SearchResult(result, records).save(out_dir)
    return result
