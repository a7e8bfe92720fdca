from kfp import dsl

from kubetrain.launch.image import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def check_accuracy(evaluation: dsl.Input[dsl.Artifact], min_accuracy: float) -> bool:
    """True if the model clears the promotion bar (a single return value: safe for dsl.If).

    Args:
        evaluation: the evaluate step's artifact (metrics.json).
        min_accuracy: the promotion bar on the primary metric (fp32 and int8).
    """

    from kubetrain.core.artifacts import Evaluation
    from kubetrain.core.logs import setup_logging
    from kubetrain.pipeline import steps

    setup_logging()  # an error is the step's one line, as in every step
    return steps.is_promotable(Evaluation.load_metrics(evaluation.path), min_accuracy)


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def check_changed(config_json: str, overrides: str, dataset: dsl.Input[dsl.Dataset]) -> bool:
    """True unless data and config match the last promoted model (retrain.only_if_changed).

    Args:
        config_json: the config sections this step uses (JSON), fixed at compile time.
        overrides: the run's overrides of those sections (JSON), from the params task.
        dataset: the dataset artifact (its version is compared).
    """
    from pathlib import Path

    from kubetrain.core.logs import setup_logging
    from kubetrain.pipeline import steps
    from kubetrain.pipeline.config import config_from_json
    from kubetrain.pipeline.params import apply_overrides

    setup_logging()
    cfg = config_from_json(apply_overrides(config_json, overrides))
    return steps.needs_training(cfg, Path(dataset.path))


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def promote(
    config_json: str,
    overrides: str,
    model: dsl.Input[dsl.Model],
    quantized: dsl.Input[dsl.Model],
    evaluation: dsl.Input[dsl.Artifact],
    promoted: dsl.Output[dsl.Model],
):
    """Publish the fp32 and int8 models with their metrics as the promoted-model artifact
    (and to retrain.registry, if set).

    Args:
        config_json: the config sections this step uses (JSON), fixed at compile time.
        overrides: the run's overrides of those sections (JSON), from the params task.
        model: the trained fp32 model.
        quantized: the int8 model.
        evaluation: the evaluate step's artifact (metrics.json).
        promoted: the promoted fp32 and int8 models with their metrics.
    """
    from pathlib import Path

    from kubetrain.core.artifacts import EVAL_METRICS
    from kubetrain.core.logs import setup_logging
    from kubetrain.pipeline import steps
    from kubetrain.pipeline.config import config_from_json
    from kubetrain.pipeline.params import apply_overrides

    setup_logging()
    record = steps.promote(
        Path(model.path), Path(quantized.path), Path(evaluation.path) / EVAL_METRICS,
        Path(promoted.path), cfg=config_from_json(apply_overrides(config_json, overrides)),
    )  # fmt: skip
    promoted.metadata.update(record)


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def reject(
    evaluation: dsl.Input[dsl.Artifact], min_accuracy: float, decision: dsl.Output[dsl.Artifact]
):
    """Record why the model was not promoted.

    Args:
        evaluation: the evaluate step's artifact (metrics.json).
        min_accuracy: the promotion bar on the primary metric (fp32 and int8).
        decision: why the model was not promoted.
    """
    from kubetrain.core.artifacts import Evaluation, Rejection, gate_reason
    from kubetrain.core.logs import setup_logging

    setup_logging()
    rejection = Rejection(gate_reason(Evaluation.load_metrics(evaluation.path), min_accuracy))
    print(rejection.reason)
    rejection.save(decision.path)
    decision.metadata.update({"promoted": False, "reason": rejection.reason})
