from kfp import dsl

from kubetrain.launch.image import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def track(
    config_json: str,
    overrides: str,
    run_name: str,
    promoted: bool,
    evaluation: dsl.Input[dsl.Artifact],
    model: dsl.Input[dsl.Model],
    quantized: dsl.Input[dsl.Model],
) -> str:
    """Log the run to MLflow (tracking.mlflow_uri): config as params, per-epoch metrics, trials as
    nested runs, the report and the fp32/int8 models; register the model if promoted. Returns the
    MLflow run's URL.

    Args:
        config_json: the config sections this step uses (JSON), fixed at compile time.
        overrides: the run's overrides of those sections (JSON), from the params task.
        run_name: the MLflow run's name (the pipeline job's name on a cluster).
        promoted: whether the gate promoted the model (it is registered if so).
        evaluation: the evaluate step's artifact (metrics.json).
        model: the trained fp32 model.
        quantized: the int8 model.
    """
    from kubetrain.core.logs import setup_logging
    from kubetrain.pipeline.params import apply_overrides
    from kubetrain.tracking.log import track_pipeline_run

    setup_logging()
    tracked = track_pipeline_run(
        apply_overrides(config_json, overrides),
        evaluation.path,
        model.path,
        quantized.path,
        promoted,
        run_name,
    )
    return tracked.url
