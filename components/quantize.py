from kfp import dsl

from kubetrain.launch.image import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def quantize(
    config_json: str,
    overrides: str,
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    quantized: dsl.Output[dsl.Model],
    quant_metrics: dsl.Output[dsl.Metrics],
):
    """fp32 -> int8 (auto-chosen or named method) behind an accuracy gate; the artifact is a
    torch.export program (TorchScript for the fbgemm backend) that reloads without kubetrain.

    Args:
        config_json: the config sections this step uses (JSON), fixed at compile time.
        overrides: the run's overrides of those sections (JSON), from the params task.
        dataset: the dataset artifact (calibration and the accuracy gate use it).
        model: the trained fp32 model.
        quantized: the int8 model and what was tried.
        quant_metrics: the chosen method, sizes and accuracy (KFP Metrics).
    """
    from pathlib import Path

    from kubetrain.core.logs import setup_logging
    from kubetrain.pipeline import steps
    from kubetrain.pipeline.config import config_from_json
    from kubetrain.pipeline.kfp_outputs import persist
    from kubetrain.pipeline.params import apply_overrides

    setup_logging()
    info = steps.quantize(
        config_from_json(apply_overrides(config_json, overrides)),
        dataset_dir=Path(dataset.path),
        model_dir=Path(model.path),
        out_dir=Path(quantized.path),
    )
    quantized.metadata.update(
        {"method": info.method, "candidate": info.name, "decision": info.decision}
    )
    for key in ("size_bytes", "fp32_size_bytes", "val_accuracy", "latency_ms_b64"):
        if getattr(info, key) is not None:
            quant_metrics.log_metric(key, getattr(info, key))
    persist(quant_metrics)
