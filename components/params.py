from typing import NamedTuple

from kfp import dsl

from kubetrain.launch.image import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def run_params(
    config_json: str,
    overrides: dict,
    data_source: str,
    train_epochs: int,
    tune_max_trials: int,
    schedule_time: str,
) -> NamedTuple(
    "StepOverrides",
    [("preprocess", str), ("check_changed", str), ("tune", str), ("train", str),
     ("quantize", str), ("evaluate", str), ("promote", str), ("track", str)],
):  # fmt: skip
    """Merge the run's parameters into the compiled config, validate it, and give each step the
    overrides of the config sections it uses (JSON); {date} in data.source is the scheduled day.

    Args:
        config_json: the whole compiled config (JSON).
        overrides: dotted config keys and values (a JSON object) for this run.
        data_source: data.source for this run ('' keeps the compiled one); {date} is the scheduled day.
        train_epochs: train.epochs for this run (0 keeps the compiled value).
        tune_max_trials: tune.max_trials for this run (0 keeps the compiled value).
        schedule_time: the time a run is for (a backend's scheduled-time placeholder; '' = now).
    """
    from kubetrain.core.logs import setup_logging
    from kubetrain.pipeline.params import STEP_SECTIONS, resolve

    setup_logging()
    steps = resolve(
        config_json, overrides, data_source, train_epochs, tune_max_trials, schedule_time
    )
    return tuple(steps[name] for name in STEP_SECTIONS)
