from kfp import dsl

from kubetrain.images import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def tune(
    config_json: str,
    dataset: dsl.Input[dsl.Dataset],
    best_params: dsl.Output[dsl.Artifact],
    search_metrics: dsl.Output[dsl.Metrics],
    search_report: dsl.Output[dsl.HTML],
) -> str:
    """Hyperparameter search (Optuna locally); writes the best parameters, every trial and a
    report. Returns the best trial's parameters as JSON (dotted config keys)."""
    import json
    import shutil
    from pathlib import Path

    from kubetrain import steps
    from kubetrain.artifacts import SEARCH_REPORT
    from kubetrain.config import config_from_json
    from kubetrain.kfp_outputs import persist
    from kubetrain.logs import setup_logging

    setup_logging()
    out = Path(best_params.path)
    result = steps.tune(config_from_json(config_json), dataset_dir=Path(dataset.path), out_dir=out)
    best_params.metadata["best_params"] = result["best_params"]
    search_metrics.log_metric("trials", result["trials_total"])
    report = out / SEARCH_REPORT
    if result["enabled"]:
        search_metrics.log_metric("best_" + result["metric"], result["best_value"])
        search_metrics.log_metric("trials_pruned", result["trials_pruned"])
        search_metrics.log_metric("trials_failed", result["trials_failed"])
        search_metrics.log_metric("trial_epochs_total", result["trial_epochs_total"])
    persist(search_metrics)
    Path(search_report.path).parent.mkdir(parents=True, exist_ok=True)
    if report.is_file():
        shutil.copyfile(report, search_report.path)
    else:
        Path(search_report.path).write_text("<p>Tuning was disabled.</p>")
    return json.dumps(result["best_params"], sort_keys=True)
