from kfp import dsl

from kubetrain.images import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def tune(
    config_json: str,
    dataset: dsl.Input[dsl.Dataset],
    best_params: dsl.Output[dsl.Artifact],
    search_metrics: dsl.Output[dsl.Metrics],
):
    """Hyperparameter search (Optuna locally); writes the best parameters and every trial."""
    from pathlib import Path

    from kubetrain import steps
    from kubetrain.config import config_from_json
    from kubetrain.kfp_outputs import persist
    from kubetrain.logs import setup_logging

    setup_logging()
    result = steps.tune(config_from_json(config_json), Path(dataset.path), Path(best_params.path))
    best_params.metadata["best_params"] = result["best_params"]
    search_metrics.log_metric("trials", result["trials_total"])
    if result["enabled"]:
        search_metrics.log_metric("best_" + result["metric"], result["best_value"])
        search_metrics.log_metric("trials_pruned", result["trials_pruned"])
        search_metrics.log_metric("trials_failed", result["trials_failed"])
    persist(search_metrics)
