from kfp import dsl

from kubetrain.launch.image import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def evaluate(
    config_json: str,
    overrides: str,
    min_accuracy: float,
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    quantized: dsl.Input[dsl.Model],
    best_params: dsl.Input[dsl.Artifact],
    evaluation: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    classification: dsl.Output[dsl.ClassificationMetrics],
    report: dsl.Output[dsl.HTML],
):
    """Accuracy and efficiency, fp32 vs int8: KFP metrics, metrics.json and an HTML report.

    Args:
        config_json: the config sections this step uses (JSON), fixed at compile time.
        overrides: the run's overrides of those sections (JSON), from the params task.
        min_accuracy: the promotion bar on the primary metric (fp32 and int8; accuracy for
            classification, evaluate.metric for seq2seq).
        dataset: the dataset artifact (its test split is evaluated).
        model: the trained fp32 model.
        quantized: the int8 model.
        best_params: the search artifact (its summary goes into the report).
        evaluation: metrics.json, details.json and report.html.
        metrics: every numeric result (KFP Metrics).
        classification: the fp32 confusion matrix (KFP ClassificationMetrics).
        report: the HTML report (KFP HTML, shown in the UI).
    """
    import shutil
    from pathlib import Path

    from kubetrain.core.artifacts import EVAL_DETAILS, EVAL_REPORT
    from kubetrain.core.io import read_json
    from kubetrain.core.logs import setup_logging
    from kubetrain.pipeline import steps
    from kubetrain.pipeline.config import config_from_json
    from kubetrain.pipeline.kfp_outputs import persist
    from kubetrain.pipeline.params import apply_overrides

    setup_logging()
    out = Path(evaluation.path)
    result = steps.evaluate(
        config_from_json(apply_overrides(config_json, overrides)),
        dataset_dir=Path(dataset.path),
        model_dir=Path(model.path),
        quantized_dir=Path(quantized.path),
        out_dir=out,
        tune_dir=Path(best_params.path),
        min_value=min_accuracy,
    )
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
    details = read_json(out / EVAL_DETAILS)
    if details.get("confusion_matrix"):  # classification only
        classification.log_confusion_matrix(details["classes"], details["confusion_matrix"])
    persist(metrics)
    persist(classification)
    shutil.copyfile(out / EVAL_REPORT, report.path)
