"""Katib Experiment: the builder (golden YAML, official models), trial records, the tune backend
seam. The tune step against a real API server, the test playing Katib: tests/cluster."""

from __future__ import annotations

import contextlib
import copy

import pytest
from kubeflow_katib_api.models import V1beta1Experiment
from pydantic import ValidationError

from fakes.golden import golden
from kubetrain.pipeline.config import load_config
from kubetrain.tune.backend import KatibBackend, OptunaBackend, get_tune_backend
from kubetrain.tune.katib import (
    METRICS_FILTER,
    build_experiment,
    config_key,
    katib_name,
    parse_metrics,
    trial_records,
)

EXP = "kubetrain-tune-0a1b2c"
GOLDEN_SETTINGS = [
    "cluster.backend=kubernetes",
    "cluster.namespace=team-a",
    "cluster.image=registry.example/kubetrain:test",
    "tune.algorithm=tpe",
    "tune.algorithm_settings={n_startup_trials: 4}",
    "tune.max_trials=12",
    "tune.parallel_trials=3",
    "tune.max_failed_trials=2",
    "tune.trial_epochs=5",
    "tune.early_stopping.algorithm=medianstop",
    "tune.parameters=[{name: train.lr, parameterType: double, feasibleSpace: {min: 0.001, "
    "max: 0.1, distribution: logUniform}}, {name: train.batch_size, parameterType: categorical, "
    "feasibleSpace: {list: [32, 64]}}, {name: model.dropout, parameterType: double, "
    "feasibleSpace: {min: 0.0, max: 0.3, step: 0.1}}]",
]


def condition(kind: str, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


def roundtrip(manifest: dict) -> dict:
    """Through kubeflow-katib-api's pydantic models and back (unknown fields are dropped)."""
    return V1beta1Experiment.from_dict(manifest).to_dict()


# training API -> the golden file of its Experiment (its trials are jobs of that kind)
GOLDENS = {"pytorchjob": "experiment.yaml", "trainjob": "experiment-trainjob.yaml"}


def settings_for(api: str, *more: str) -> list[str]:
    return [*GOLDEN_SETTINGS, f"cluster.training_api={api}", *more]


@pytest.mark.parametrize("api", sorted(GOLDENS))
def test_experiment_matches_golden_yaml(api):
    cfg = load_config(None, settings_for(api, "cluster.queue_name=gpu-queue"))
    assert build_experiment(cfg, EXP) == golden(GOLDENS[api], build_experiment(cfg, EXP))


@pytest.mark.parametrize("api", sorted(GOLDENS))
def test_experiment_survives_a_roundtrip_through_the_official_models(api):
    exp = build_experiment(load_config(None, settings_for(api)), EXP)
    assert roundtrip(exp) == exp


# What Katib is told about each kind of trial job (Katib v0.19's defaults for TrainJob).
TRIAL_TEMPLATES = {
    "pytorchjob": ("PyTorchJob", "pytorch", {"training.kubeflow.org/job-role": "master"},
                   "Succeeded"),
    "trainjob": ("TrainJob", "node", {"jobset.sigs.k8s.io/replicatedjob-name": "node",
                                      "batch.kubernetes.io/job-completion-index": "0"},
                 "Complete"),
}  # fmt: skip


@pytest.mark.parametrize("api", sorted(TRIAL_TEMPLATES))
def test_the_trials_are_jobs_of_the_training_api_in_the_queue(api):
    kind, container, primary, success = TRIAL_TEMPLATES[api]
    cfg = load_config(
        None, settings_for(api, "cluster.queue_name=gpu-queue", "cluster.priority_class=high")
    )
    template = build_experiment(cfg, EXP)["spec"]["trialTemplate"]
    assert template["trialSpec"]["kind"] == kind
    assert template["primaryContainerName"] == container
    assert template["primaryPodLabels"] == primary
    assert (
        template["successCondition"]
        == f'status.conditions.#(type=="{success}")#|#(status=="True")#'
    )
    assert template["failureCondition"] == 'status.conditions.#(type=="Failed")#|#(status=="True")#'
    labels = template["trialSpec"]["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert labels["kueue.x-k8s.io/priority-class"] == "high"
    assert "name" not in template["trialSpec"]["metadata"]  # Katib names each trial's job


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda e: e["spec"].update(maxTrialsCount=3), id="misspelt-spec-field"),
        pytest.param(lambda e: e["spec"]["objective"].update(metric="x"), id="unknown-objective"),
        pytest.param(lambda e: e["spec"].update(maxTrialCount="12"), id="count-as-text"),
        pytest.param(
            lambda e: e["spec"]["trialTemplate"].update(primaryContainer="pytorch"),
            id="misspelt-template-field",
        ),
    ],
)
def test_a_wrong_field_does_not_survive_the_official_models(mutate):
    bad = copy.deepcopy(build_experiment(load_config(None, settings_for("pytorchjob")), EXP))
    mutate(bad)
    # Either the models drop what they do not know, or they reject it outright.
    with contextlib.suppress(ValidationError):
        assert roundtrip(bad) != bad


def trial_command(spec: dict) -> list[str]:
    job = spec["trialTemplate"]["trialSpec"]["spec"]
    if "trainer" in job:
        return job["trainer"]["command"]
    return job["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]


@pytest.mark.parametrize("api", sorted(GOLDENS))
def test_the_search_space_is_the_config_search_space(api):
    cfg = load_config(None, settings_for(api))
    spec = build_experiment(cfg, EXP)["spec"]
    assert [p["name"] for p in spec["parameters"]] == [
        "train-lr",
        "train-batch_size",
        "model-dropout",
    ]
    # log-uniform ranges are sampled continuously, as by the local engine
    assert "step" not in spec["parameters"][0]["feasibleSpace"]
    assert spec["parameters"][1]["feasibleSpace"] == {"list": ["32", "64"]}
    assert spec["algorithm"]["algorithmSettings"] == [
        {"name": "n_startup_trials", "value": "4"}, {"name": "random_state", "value": "0"},
    ]  # fmt: skip
    assert (spec["maxTrialCount"], spec["parallelTrialCount"], spec["maxFailedTrialCount"]) == (
        12, 3, 2,
    )  # fmt: skip
    command = trial_command(spec)
    sets = [command[i + 1] for i, a in enumerate(command) if a == "--set"]
    assert sets == [
        "train.lr=${trialParameters.train-lr}",
        "train.batch_size=${trialParameters.train-batch_size}",
        "model.dropout=${trialParameters.model-dropout}",
    ]
    refs = {p["name"] for p in spec["trialTemplate"]["trialParameters"]}
    assert refs == {p["name"] for p in spec["parameters"]}


def test_grid_budget_is_capped_by_the_grid_as_locally():
    cfg = load_config(None, ["cluster.image=img:1", "tune.algorithm=grid", "tune.max_trials=50"])
    spec = build_experiment(cfg, EXP)["spec"]
    assert spec["maxTrialCount"] == 4 * 3  # lr 0.001..0.01 step 0.003 x 3 weight decays
    assert spec["parameters"][0]["feasibleSpace"]["step"] == "0.003"
    assert "algorithmSettings" not in spec["algorithm"]


@pytest.mark.parametrize("key", ["train.lr", "train.weight_decay", "model.hidden_sizes.0"])
def test_parameter_names_map_to_katib_and_back(key):
    assert "." not in katib_name(key) and config_key(katib_name(key)) == key


def test_the_collector_filter_keeps_only_the_metrics():
    text = (
        "[rank 0] epoch 1/2 loss 0.3 val_loss 0.2 val_acc 0.91\n"
        "2025-01-31T12:00:00.000001Z epoch=1 val_accuracy=0.912345 val_loss=0.250000 "
        "train_loss=3.1e-01\n"
        "lr=1e-3 something else\n"
    )
    assert parse_metrics(text, ["val_accuracy", "val_loss"]) == [
        ("val_accuracy", 0.912345), ("val_loss", 0.25),
    ]  # fmt: skip
    assert "(" in METRICS_FILTER and METRICS_FILTER.count("(") - METRICS_FILTER.count("(?:") == 2


def test_trial_records_map_katib_trials_like_the_local_engine():
    trials = [
        {
            "metadata": {"name": "t-b", "creationTimestamp": "2025-01-01T00:00:02Z"},
            "spec": {"parameterAssignments": [{"name": "train-lr", "value": "0.01"}]},
            "status": {
                "conditions": [condition("EarlyStopped")],
                "observation": {"metrics": [{"name": "val_accuracy", "latest": "0.5"}]},
            },
        },
        {
            "metadata": {"name": "t-a", "creationTimestamp": "2025-01-01T00:00:01Z"},
            "spec": {"parameterAssignments": [{"name": "train-lr", "value": "0.003"}]},
            "status": {
                "conditions": [condition("Succeeded")],
                "observation": {"metrics": [{"name": "val_accuracy", "latest": "0.97"}]},
            },
        },
        {
            "metadata": {"name": "t-c", "creationTimestamp": "2025-01-01T00:00:03Z"},
            "spec": {"parameterAssignments": [{"name": "train-lr", "value": "0.1"}]},
            "status": {"conditions": [condition("Failed", "TrialFailed", "OOMKilled")]},
        },
    ]
    records = trial_records(trials, "val_accuracy")
    assert [(r.number, r.name, r.state, r.value) for r in records] == [
        (0, "t-a", "complete", 0.97), (1, "t-b", "pruned", 0.5), (2, "t-c", "fail", None),
    ]  # fmt: skip
    assert records[0].params == {"train.lr": 0.003}
    assert records[2].error == "TrialFailed: OOMKilled"


def test_the_tune_backend_is_chosen_by_cluster_backend():
    assert isinstance(get_tune_backend(load_config(None, ["cluster.backend=kubernetes"])),
                      KatibBackend)  # fmt: skip
    assert isinstance(get_tune_backend(load_config(None, [])), OptunaBackend)


PROCESS_SPACE = {
    "train.nproc": "{name: train.nproc, parameterType: int, feasibleSpace: {min: 1, max: 2}}",
    "train.nnodes": "{name: train.nnodes, parameterType: int, feasibleSpace: {min: 1, max: 2}}",
}


@pytest.mark.parametrize(
    "key, backend, refused",
    [
        ("train.nproc", "kubernetes", True),
        ("train.nnodes", "kubernetes", True),
        ("train.nproc", "local", False),  # the local engine runs a trial with the searched count
    ],
    ids=["nproc-on-katib", "nnodes-on-katib", "nproc-locally"],
)
def test_a_process_count_in_the_search_space_is_refused_on_katib(key, backend, refused):
    from kubetrain.core.errors import ConfigError

    lr = "{name: train.lr, parameterType: double, feasibleSpace: {min: 0.001, max: 0.1}}"
    settings = [f"cluster.backend={backend}", f"tune.parameters=[{lr}, {PROCESS_SPACE[key]}]"]
    with pytest.raises(ConfigError) if refused else contextlib.nullcontext() as err:
        load_config(None, settings)
    if refused:
        message = str(err.value)
        assert "\n" not in message
        expected = f"tune.parameters.1.name: '{key}' cannot be searched with cluster.backend="
        assert expected + "kubernetes" in message, message
        assert "tune.trial_nproc" in message


def test_a_process_count_is_not_refused_when_tune_is_off():
    settings = ["cluster.backend=kubernetes", "tune.enabled=false",
                f"tune.parameters=[{PROCESS_SPACE['train.nproc']}]"]  # fmt: skip
    assert load_config(None, settings).tune.parameters[0].name == "train.nproc"
