from kfp import dsl

from kubetrain.launch.image import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def tune(
    config_json: str,
    overrides: str,
    dataset: dsl.Input[dsl.Dataset],
    best_params: dsl.Output[dsl.Artifact],
    search_metrics: dsl.Output[dsl.Metrics],
    search_report: dsl.Output[dsl.HTML],
) -> str:
    """Hyperparameter search (Optuna locally); writes the best parameters, every trial and a
    report. Returns the best trial's parameters as JSON (dotted config keys).

    Args:
        config_json: the config sections this step uses (JSON), fixed at compile time.
        overrides: the run's overrides of those sections (JSON), from the params task.
        dataset: the dataset artifact from preprocess.
        best_params: the best parameters and every trial (the search artifact).
        search_metrics: the best objective and the number of trials (KFP Metrics).
        search_report: the search's HTML report (KFP HTML).
    """
    import json
    import shutil
    from pathlib import Path

    from kubetrain.core.artifacts import SEARCH_REPORT
    from kubetrain.core.logs import setup_logging
    from kubetrain.pipeline import steps
    from kubetrain.pipeline.config import config_from_json
    from kubetrain.pipeline.kfp_outputs import persist
    from kubetrain.pipeline.params import apply_overrides

    setup_logging()
    out = Path(best_params.path)
    result = steps.tune(
        config_from_json(apply_overrides(config_json, overrides)),
        dataset_dir=Path(dataset.path),
        out_dir=out,
    )
    best_params.metadata["best_params"] = result.best_params
    search_metrics.log_metric("trials", result.trials_total)
    report = out / SEARCH_REPORT
    if result.enabled:
        search_metrics.log_metric(f"best_{result.metric}", result.best_value)
        search_metrics.log_metric("trials_pruned", result.trials_pruned)
        search_metrics.log_metric("trials_failed", result.trials_failed)
        if result.trial_epochs_total is not None:  # Katib cannot tell
            search_metrics.log_metric("trial_epochs_total", result.trial_epochs_total)
    persist(search_metrics)
    Path(search_report.path).parent.mkdir(parents=True, exist_ok=True)
    if report.is_file():
        shutil.copyfile(report, search_report.path)
    else:
        Path(search_report.path).write_text("<p>Tuning was disabled.</p>")
    return json.dumps(result.best_params, sort_keys=True)
