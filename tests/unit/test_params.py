"""Run-time parameters of the compiled pipeline (kubetrain.pipeline.params): the merge each step does,
the ``params`` task's split by step, ``{date}`` from the scheduled time, and the compiled IR."""

from __future__ import annotations

import json
from datetime import date, datetime, timezone

import pytest
import yaml

from kubetrain import components as c
from kubetrain.core.errors import ConfigError
from kubetrain.pipeline.config import load_config
from kubetrain.pipeline.params import (
    SCHEDULE_PLACEHOLDER,
    STEP_SECTIONS,
    apply_overrides,
    expand_date,
    resolve,
    schedule_time,
    split_sets,
)

WHOLE = load_config().sections_json(*type(load_config()).model_fields)
NOV30 = "2026-11-30T03:00:00Z"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("s3://bucket/{date}/", "s3://bucket/2026-11-30/"),
        ("gs://b/{date:%Y/%m/%d}/*.parquet", "gs://b/2026/11/30/*.parquet"),
        ("/data/{date-1}.csv", "/data/2026-11-29.csv"),
        ("/data/{date+2:%Y%m%d}.csv", "/data/20261202.csv"),
        ("/data/{a,b}/{date}.csv", "/data/{a,b}/2026-11-30.csv"),  # other braces stay
        ("digits", "digits"),
    ],
    ids=["plain", "format", "minus-one-day", "plus-format", "other-braces", "no-token"],
)
def test_date_token_expands_from_the_scheduled_time(source, expected):
    assert expand_date(source, schedule_time(NOV30)) == expected


@pytest.mark.parametrize(
    "text",
    ["2026-11-30T03:00:00Z", "2026-11-30T03:00:00.123456789Z", "2026-11-30T04:00:00+01:00"],
    ids=["rfc3339", "nanoseconds", "offset"],
)
def test_schedule_time_reads_what_kfp_writes(text):
    assert schedule_time(text).replace(microsecond=0) == datetime(
        2026, 11, 30, 3, tzinfo=timezone.utc
    )


@pytest.mark.parametrize("text", ["", SCHEDULE_PLACEHOLDER], ids=["empty", "unresolved"])
def test_schedule_time_falls_back_to_today_when_unresolved(text):
    assert schedule_time(text).date() == datetime.now(timezone.utc).date()


def test_schedule_time_rejects_garbage_in_one_line():
    with pytest.raises(ConfigError, match=r"schedule_time: 'yesterday' is not an RFC 3339 time"):
        schedule_time("yesterday")


def test_resolve_gives_each_step_only_the_overrides_of_its_sections():
    steps = resolve(
        WHOLE,
        {"train.lr": 0.01, "quantize.method": "dynamic_int8", "data.source": "s3://b/{date}/"},
        train_epochs=3,
        tune_max_trials=2,
        scheduled=NOV30,
    )
    assert set(steps) == set(STEP_SECTIONS)
    got = {step: json.loads(text) for step, text in steps.items()}
    assert got["preprocess"] == {"data.source": "s3://b/2026-11-30/"}
    assert got["quantize"] == {"quantize.method": "dynamic_int8"}
    assert got["evaluate"] == {}
    assert got["train"] == {"data.source": "s3://b/2026-11-30/", "train.epochs": 3,
                            "train.lr": 0.01}  # fmt: skip
    assert got["tune"]["tune.max_trials"] == 2 and "quantize.method" not in got["tune"]
    for step, sections in STEP_SECTIONS.items():
        assert {k.split(".")[0] for k in got[step]} <= set(sections), step


def test_a_step_cache_key_changes_only_with_overrides_it_uses():
    base = resolve(WHOLE, {"train.epochs": 3})
    changed = resolve(WHOLE, {"train.epochs": 4})
    differs = {step for step in STEP_SECTIONS if base[step] != changed[step]}
    assert differs == {s for s, sections in STEP_SECTIONS.items() if "train" in sections}
    assert "quantize" not in differs and "preprocess" not in differs


@pytest.mark.parametrize(
    ("key", "value", "quantize_changes"),
    [("evaluate.beat_copy_baseline", False, False), ("evaluate.latency_repeats", 7, False),
     ("evaluate.metric", "top5_accuracy", True), ("evaluate.beam_size", 4, True)],
)  # fmt: skip
def test_quantize_keys_on_the_evaluate_fields_its_gate_uses(key, value, quantize_changes):
    """The int8 gate measures as evaluate will (metric, decoding), so those re-run quantize; the
    latency settings and the other evaluate fields do not (its cache stays valid; the promotion
    bar is the min_accuracy pipeline parameter, which quantize never sees)."""
    base, changed = resolve(WHOLE, {}), resolve(WHOLE, {key: value})
    assert (base["quantize"] != changed["quantize"]) is quantize_changes
    assert base["evaluate"] != changed["evaluate"]


def test_named_parameters_win_and_unset_ones_leave_the_compiled_value():
    steps = resolve(WHOLE, {"train.epochs": 7}, data_source="", train_epochs=2)
    assert json.loads(steps["train"]) == {"train.epochs": 2}
    assert json.loads(resolve(WHOLE, {})["train"]) == {}


def test_json_numbers_arrive_as_validated_types():
    # A KFP struct carries every number as a double; the steps see what the config means.
    steps = resolve(WHOLE, {"train.epochs": 3.0, "model.hidden_sizes": [32.0]})
    assert json.loads(steps["train"]) == {"model.hidden_sizes": [32], "train.epochs": 3}
    assert '"train.epochs": 3}' in steps["train"]


@pytest.mark.parametrize(
    ("overrides", "named", "message"),
    [
        ({"train.epochs": 0}, {}, "config error: train.epochs: Input should be greater than or "
         "equal to 1 (got 0)"),
        ({"train.nope": 1}, {}, "config error: train.nope: no such field"),
        ({}, {"tune_max_trials": -1}, "config error: tune.max_trials: Input should be greater "
         "than or equal to 1 (got -1)"),
        ({"cluster.backend": "kubernetes"}, {}, "config error: overrides: cluster.backend: fixed "
         "when the pipeline is compiled"),
        ({"retrain.registry": "/r"}, {}, "config error: overrides: retrain.registry: fixed"),
        ({"evaluate.min_accuracy": 0.5}, {}, "config error: overrides: evaluate.min_accuracy: "
         "set the min_accuracy pipeline parameter instead"),
        (["train.epochs"], {}, "config error: overrides: expected a JSON object"),
    ],
    ids=["bad-value", "unknown-field", "bad-named", "compile-time", "retrain", "min-accuracy",
         "not-an-object"],
)  # fmt: skip
def test_bad_overrides_fail_in_one_line(overrides, named, message):
    with pytest.raises(ConfigError) as err:
        resolve(WHOLE, overrides, **named)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_a_step_merges_and_fails_with_the_same_line_as_set():
    cfg = load_config()
    merged = json.loads(apply_overrides(cfg.sections_json("train"), '{"train.epochs": 2}'))
    assert set(merged) == {"train"} and merged["train"]["epochs"] == 2
    assert apply_overrides(cfg.sections_json("train"), "{}") == cfg.sections_json("train")
    with pytest.raises(ConfigError) as local:
        load_config(overrides=["train.lr=-1"])
    with pytest.raises(ConfigError) as step:
        apply_overrides(cfg.sections_json("train"), '{"train.lr": -1}')
    assert str(step.value) == str(local.value)


@pytest.mark.parametrize(
    ("sets", "compiled", "params"),
    [
        (["cluster.backend=kubernetes"], ["cluster.backend=kubernetes"], {}),
        (["data.source=s3://b/{date}/", "train.epochs=3"], [],
         {"data_source": "s3://b/{date}/", "train_epochs": 3}),
        (["evaluate.min_accuracy=0.5"], [], {"min_accuracy": 0.5}),
        (["train.lr=0.01", "tune.max_trials=4"], [],
         {"overrides": {"train.lr": 0.01}, "tune_max_trials": 4}),
    ],
    ids=["compile-time", "named", "min-accuracy", "general"],
)  # fmt: skip
def test_submit_sets_split_into_compiled_and_run_time(sets, compiled, params):
    assert split_sets(sets) == (compiled, params)


def _compile(tmp_path, *sets: str, schedule: str = SCHEDULE_PLACEHOLDER) -> dict:
    from kfp import compiler
    from kubetrain.pipelines import build_pipeline

    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(
        build_pipeline(load_config(overrides=list(sets)), schedule), str(out)
    )
    return yaml.safe_load(out.read_text())


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of the IR by name, nested DAGs (dsl.If branches) included."""
    found = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        found.update(comp.get("dag", {}).get("tasks", {}))
    return found


@pytest.mark.parametrize("only_if_changed", [False, True], ids=["pipeline", "retrain-pipeline"])
def test_compiled_ir_takes_the_run_time_parameters(tmp_path, only_if_changed):
    sets = ["retrain.only_if_changed=true", "retrain.registry=/r"] if only_if_changed else []
    spec = _compile(tmp_path, *sets)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in params.items()} == {
        "min_accuracy": "NUMBER_DOUBLE", "data_source": "STRING", "train_epochs": "NUMBER_INTEGER",
        "tune_max_trials": "NUMBER_INTEGER", "overrides": "STRUCT",
    }  # fmt: skip
    tasks = _tasks(spec)
    run_params = tasks["run-params"]
    assert run_params["cachingOptions"].get("enableCache", False) is False
    inputs = run_params["inputs"]["parameters"]
    # The backend resolves the placeholder only when it is the whole constant value.
    assert inputs["schedule_time"]["runtimeValue"]["constant"] == SCHEDULE_PLACEHOLDER
    for name in ("overrides", "data_source", "train_epochs", "tune_max_trials"):
        assert inputs[name]["componentInputParameter"] == name
    steps = {"preprocess", "tune", "train", "quantize", "evaluate", "promote"}
    if only_if_changed:
        steps.add("check-changed")
    for task_name in steps:
        task_inputs = tasks[task_name]["inputs"]["parameters"]
        step = task_name.replace("-", "_")
        source = task_inputs["overrides"]
        # inside a dsl.If branch the value arrives as the branch's input channel
        channel = source.get("componentInputParameter")
        if channel:
            assert channel == f"pipelinechannel--run-params-{step}", task_name
        else:
            assert source["taskOutputParameter"] == {
                "outputParameterKey": step, "producerTask": "run-params",
            }, task_name  # fmt: skip
        sections = json.loads(task_inputs["config_json"]["runtimeValue"]["constant"])
        listed = STEP_SECTIONS[step]  # whole sections, or dotted fields of one
        got = [name for section, body in sections.items()
               for name in ([section] if section in listed else [f"{section}.{f}" for f in body])]  # fmt: skip
        assert sorted(got) == sorted(listed), task_name


def test_params_component_outputs_one_string_per_step():
    outputs = c.run_params.component_spec.outputs
    assert list(outputs) == list(STEP_SECTIONS)


def test_a_local_build_has_no_placeholder_kfp_local_cannot_resolve(tmp_path):
    spec = _compile(tmp_path, schedule="")
    assert SCHEDULE_PLACEHOLDER not in json.dumps(spec)


def test_params_task_as_kfp_runs_it_expands_the_date_for_each_step():
    # The component's own function, given the values a backend resolves.
    out = c.run_params.python_func(
        config_json=WHOLE, overrides={"data.source": "s3://b/{date}/"}, data_source="",
        train_epochs=0, tune_max_trials=0, schedule_time=NOV30,
    )  # fmt: skip
    by_step = dict(zip(STEP_SECTIONS, out, strict=True))
    assert json.loads(by_step["preprocess"]) == {"data.source": "s3://b/2026-11-30/"}
    assert by_step["quantize"] == "{}"
    assert date(2026, 11, 30).isoformat() in by_step["train"]
