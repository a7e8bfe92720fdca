from kfp import dsl

from kubetrain.launch.image import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def train(
    config_json: str,
    overrides: str,
    dataset: dsl.Input[dsl.Dataset],
    best_params: dsl.Input[dsl.Artifact],
    model: dsl.Output[dsl.Model],
    train_metrics: dsl.Output[dsl.Metrics],
):
    """Distributed training (torchrun locally) with the tuned parameters.

    Args:
        config_json: the config sections this step uses (JSON), fixed at compile time.
        overrides: the run's overrides of those sections (JSON), from the params task.
        dataset: the dataset artifact from preprocess.
        best_params: the search artifact; its best parameters are applied to the config.
        model: the trained fp32 model, its history and training metrics.
        train_metrics: throughput, data-wait share and final validation accuracy (KFP Metrics).
    """
    from pathlib import Path

    from kubetrain.core.artifacts import SearchResult
    from kubetrain.core.logs import setup_logging
    from kubetrain.pipeline import steps
    from kubetrain.pipeline.config import config_from_json
    from kubetrain.pipeline.kfp_outputs import persist
    from kubetrain.pipeline.params import apply_overrides

    setup_logging()
    summary = steps.train(
        config_from_json(apply_overrides(config_json, overrides)),
        dataset_dir=Path(dataset.path),
        out_dir=Path(model.path),
        params_file=SearchResult.best_params_file(best_params.path),
    )
    model.metadata["framework"] = "pytorch"
    if summary.training_api:  # which cluster job trained it (TrainJob or PyTorchJob)
        model.metadata["training_api"] = summary.training_api
    train_metrics.log_metric("samples_per_second", summary.samples_per_second)
    train_metrics.log_metric("train_seconds", summary.train_seconds)
    train_metrics.log_metric("data_wait_share", summary.data_wait_share)
    train_metrics.log_metric("final_val_accuracy", summary.final_val_accuracy)
    train_metrics.log_metric("world_size", summary.world_size)
    persist(train_metrics)
