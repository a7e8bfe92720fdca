"""Run-time parameters of the compiled pipeline: what a manual or scheduled run can change
without recompiling.

The compiled pipeline carries its config as constants (each step's sections, so caching keys on
what a step uses). On top of them a run takes these pipeline parameters:

    data_source       data.source        ("" = as compiled)
    train_epochs      train.epochs       (0 = as compiled)
    tune_max_trials   tune.max_trials    (0 = as compiled)
    min_accuracy      evaluate.min_accuracy (the promotion bar; always set)
    overrides         any other dotted keys -> values, a JSON object ({"train.lr": 0.01})

The first task (``params``) merges them into the whole config, validates it (the same one-line
``config error: <dotted field>: ...`` as ``--set``), and hands every step the overrides of the
sections that step uses, as JSON: a step's cache key changes exactly when an override it uses
changes. Each step merges its overrides into its config with ``apply_overrides`` and validates
again with the same model.

A recurring run can read dated data: ``{date}`` in ``data.source`` is replaced by the day the
run was scheduled for (``s3://bucket/{date}/`` -> ``s3://bucket/2026-11-30/``); ``{date:%Y/%m/%d}``
takes a strftime format and ``{date-1}`` shifts by days. The time is KFP's
``dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER``: a KFP backend that resolves it gives the
scheduled time of a recurring run (the creation time of a manual one); where it arrives
unresolved (kfp.local, older backends) the current UTC time is used.

Some keys shape the compiled pipeline itself (which tasks exist, what they mount) and are fixed
when it is compiled: ``COMPILE_TIME_KEYS``. ``kubetrain submit/schedule --set`` compiles those in
and sends every other ``--set`` as a run-time parameter (``split_sets``).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from kubetrain.core.config import parse_override
from kubetrain.core.errors import ConfigError
from kubetrain.pipeline.config import PipelineConfig, config_from_json, validate_config
from kubetrain.tasks.config import ScoringConfig

log = logging.getLogger(__name__)

# Named pipeline parameters and the config field each one sets ("unset" values leave it alone).
NAMED: dict[str, str] = {
    "data_source": "data.source",
    "train_epochs": "train.epochs",
    "tune_max_trials": "tune.max_trials",
}
UNSET: dict[str, Any] = {"data_source": "", "train_epochs": 0, "tune_max_trials": 0}
MIN_ACCURACY = "evaluate.min_accuracy"  # the `min_accuracy` pipeline parameter
# Both bar keys set the `min_accuracy` parameter: the bar on the primary metric (accuracy, BLEU..).
BAR_KEYS = (MIN_ACCURACY, "evaluate.min_value")

# Fields the pipeline's structure depends on (pipelines/training.py reads them while building):
# a run cannot change them, a recompile can. A key equal to one of these or below it is refused.
COMPILE_TIME_KEYS = (
    "cluster.backend", "cluster.pvc_name", "cluster.mount_path", "retrain", "tracking",
    # preprocess fanned out: how many convert tasks, how many at once, retries, claim mounts
    "data.parallel_tasks", "data.max_parallel_tasks", "data.convert_retries", "data.shard_store",
)  # fmt: skip

# The config sections each step receives (pipelines/training.py passes the same ones).
STEP_SECTIONS: dict[str, tuple[str, ...]] = {
    "preprocess": ("data",),
    "check_changed": ("data", "model", "train", "tune", "quantize", "evaluate", "retrain"),
    "tune": ("data", "model", "train", "tune", "cluster"),
    "train": ("data", "model", "train", "cluster"),
    # The gate measures as evaluate will (its metric and decoding), not at evaluate's bar.
    "quantize": ("quantize", *(f"evaluate.{field}" for field in ScoringConfig.model_fields)),
    "evaluate": ("evaluate",),
    "promote": ("data", "model", "train", "tune", "quantize", "evaluate", "retrain"),
    # tracking.mlflow_uri set: the track task logs the whole effective config
    "track": ("data", "model", "train", "tune", "quantize", "evaluate", "cluster", "retrain",
              "tracking"),
}  # fmt: skip

SCHEDULE_PLACEHOLDER = "{{$.pipeline_job_schedule_time_utc}}"  # dsl.PIPELINE_JOB_SCHEDULE_...
DATE_TOKEN = re.compile(r"\{date(?P<shift>[+-]\d+)?(?::(?P<fmt>[^{}]*))?\}")


def is_compile_time(key: str) -> bool:
    """True if ``key`` (dotted) is fixed when the pipeline is compiled."""
    return any(key == k or key.startswith(k + ".") for k in COMPILE_TIME_KEYS)


def _check_keys(overrides: Any, where: str) -> dict[str, Any]:
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
        raise ConfigError(
            f"config error: {where}: expected a JSON object of dotted keys, e.g. "
            '{"data.source": "s3://bucket/2026-11-30/"}'
        )
    for key in overrides:
        if key in BAR_KEYS:
            raise ConfigError(
                f"config error: {where}: {key}: set the min_accuracy pipeline parameter instead"
            )
        if is_compile_time(key):
            raise ConfigError(
                f"config error: {where}: {key}: fixed when the pipeline is compiled; recompile "
                f"with --set {key}=... (kubetrain compile/submit/schedule)"
            )
    return dict(overrides)


def schedule_time(text: str) -> datetime:
    """The scheduled time KFP passed (RFC 3339, UTC); now (UTC) if it came unresolved or empty.

    Raises:
        ConfigError: ``text`` is neither a timestamp nor the unresolved placeholder.
    """
    text = (text or "").strip()
    if not text or text.startswith("{{"):
        log.info("no scheduled time from the orchestrator: {date} is today (UTC)")
        return datetime.now(timezone.utc)
    # Python 3.10 reads neither "Z" nor nanoseconds; KFP writes both.
    norm = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    try:
        when = datetime.fromisoformat(norm)
    except ValueError:
        raise ConfigError(
            f"config error: schedule_time: {text!r} is not an RFC 3339 time"
        ) from None
    return (
        when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)
    )


def expand_date(source: str, when: datetime) -> str:
    """``source`` with each ``{date}``, ``{date:FMT}``, ``{date+N}`` / ``{date-N}`` (days)
    replaced from ``when``; other braces (globs) are left alone."""

    def one(m: re.Match) -> str:
        day = when + timedelta(days=int(m["shift"] or 0))
        return day.strftime(m["fmt"] or "%Y-%m-%d")

    return DATE_TOKEN.sub(one, source)


def resolve(
    config_json: str,
    overrides: dict[str, Any] | None,
    data_source: str = "",
    train_epochs: int = 0,
    tune_max_trials: int = 0,
    scheduled: str = "",
) -> dict[str, str]:
    """Merge a run's parameters into the compiled config and split them by step.

    Args:
        config_json: the whole compiled config (``PipelineConfig.sections_json`` of all sections).
        overrides: the ``overrides`` pipeline parameter (dotted keys -> values).
        data_source, train_epochs, tune_max_trials: the named parameters; their unset values
            ("" / 0) leave the compiled value; a set one wins over the same key in ``overrides``.
        scheduled: the scheduled time (``SCHEDULE_PLACEHOLDER`` as KFP resolves it) for
            ``{date}`` in ``data.source``.

    Returns:
        ``{step: JSON of the overrides of that step's sections}`` for every step of
        ``STEP_SECTIONS`` (``"{}"`` where none apply).

    Raises:
        ConfigError: a key that is not a config field, a compile-time key, an invalid value
            (one line naming the dotted field, as ``--set`` does).
    """
    merged = _check_keys(overrides or {}, "overrides")
    given = {"data_source": data_source, "train_epochs": train_epochs,
             "tune_max_trials": tune_max_trials}  # fmt: skip
    for name, value in given.items():
        if value != UNSET[name]:
            merged[NAMED[name]] = value
    cfg = config_from_json(config_json)
    source = merged.get("data.source", cfg.data.source)
    if isinstance(source, str) and DATE_TOKEN.search(source):
        merged["data.source"] = expand_date(source, schedule_time(scheduled))
    # Validate the whole merged config (raises ConfigError), then keep each value as validated:
    # JSON numbers arrive as doubles (epochs 3.0), and the steps' cache keys should not care.
    dumped = cfg.with_params(merged).model_dump(mode="json")
    merged = {key: _dotted(dumped, key) for key in merged}
    if merged:
        log.info("run-time overrides: %s", json.dumps(merged, sort_keys=True))
    return {
        step: json.dumps({k: v for k, v in merged.items() if _within(k, sections)},
                         sort_keys=True)
        for step, sections in STEP_SECTIONS.items()
    }  # fmt: skip


def _within(key: str, sections: tuple[str, ...]) -> bool:
    """``key`` (dotted) is one of ``sections`` (sections or dotted fields), lies below one, or
    holds one (a whole section set at once)."""
    return any(key == s or key.startswith(s + ".") or s.startswith(key + ".") for s in sections)


def _dotted(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def apply_overrides(config_json: str, overrides_json: str) -> str:
    """A step's config JSON with its run-time overrides merged in and validated.

    Args:
        config_json: the sections the step was compiled with (``sections_json``).
        overrides_json: that step's output of the ``params`` task (dotted keys -> values).

    Returns:
        JSON of the same sections, overrides applied (``config_json`` itself if none).

    Raises:
        ConfigError: an override names no field or gives an invalid value (one line).
    """
    try:
        overrides = json.loads(overrides_json or "{}")
    except ValueError:
        raise ConfigError(f"config error: overrides: not JSON: {overrides_json[:80]!r}") from None
    overrides = _check_keys(overrides, "overrides")
    if not overrides:
        return config_json
    data = json.loads(config_json)
    cfg = validate_config(data).with_params(overrides)
    return cfg.sections_json(*data)


def split_sets(sets: list[str] | tuple[str, ...]) -> tuple[list[str], dict[str, Any]]:
    """``--set`` items of ``kubetrain submit/schedule``: (compiled in, run-time parameters).

    Compile-time keys stay ``--set`` items for the compile; ``evaluate.min_accuracy`` and the
    named fields become their pipeline parameters; every other key goes into ``overrides``.

    Raises:
        ConfigError: an item is not ``KEY=VALUE``.
    """
    compiled: list[str] = []
    params: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    by_key = {key: name for name, key in NAMED.items()}
    for text in sets:
        key, value = parse_override(text)
        if is_compile_time(key):
            compiled.append(text)
        elif key in BAR_KEYS:
            params["min_accuracy"] = value
        elif key in by_key and value != UNSET[by_key[key]]:
            params[by_key[key]] = value
        else:
            overrides[key] = value
    if overrides:
        params["overrides"] = overrides
    return compiled, params


def pipeline_arguments(cfg: PipelineConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The run's parameters as KFP takes them: ``min_accuracy`` always (the compiled bar unless
    given), the others only when set."""
    from kubetrain.pipeline.steps import promotion_bar

    return {"min_accuracy": promotion_bar(cfg), **params}
