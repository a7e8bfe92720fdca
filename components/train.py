from kfp import dsl

from kubetrain.images import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def train(
    config_json: str,
    dataset: dsl.Input[dsl.Dataset],
    best_params: dsl.Input[dsl.Artifact],
    model: dsl.Output[dsl.Model],
    train_metrics: dsl.Output[dsl.Metrics],
):
    """Distributed training (torchrun locally) with the tuned parameters."""
    from pathlib import Path

    from kubetrain import steps
    from kubetrain.artifacts import SearchResult
    from kubetrain.config import config_from_json
    from kubetrain.kfp_outputs import persist
    from kubetrain.logs import setup_logging

    setup_logging()
    summary = steps.train(
        config_from_json(config_json),
        dataset_dir=Path(dataset.path),
        out_dir=Path(model.path),
        params_file=SearchResult.best_params_file(best_params.path),
    )
    model.metadata["framework"] = "pytorch"
    for key in ("samples_per_second", "train_seconds", "data_wait_share", "final_val_accuracy"):
        train_metrics.log_metric(key, summary[key])
    train_metrics.log_metric("world_size", summary["world_size"])
    persist(train_metrics)
