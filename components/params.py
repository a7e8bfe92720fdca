from typing import NamedTuple

from kfp import dsl

from kubetrain.images import runtime_image


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
    overrides of the config sections it uses (JSON); {date} in data.source is the scheduled day."""
    from kubetrain.logs import setup_logging
    from kubetrain.params import STEP_SECTIONS, resolve

    setup_logging()
    steps = resolve(
        config_json, overrides, data_source, train_epochs, tune_max_trials, schedule_time
    )
    return tuple(steps[name] for name in STEP_SECTIONS)
