from kfp import dsl

from kubetrain.images import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def quantize(
    config_json: str,
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    quantized: dsl.Output[dsl.Model],
    quant_metrics: dsl.Output[dsl.Metrics],
):
    """fp32 -> int8 (auto-chosen or named method) behind an accuracy gate; the artifact is a
    torch.export program (TorchScript for the fbgemm backend) that reloads without kubetrain."""
    from pathlib import Path

    from kubetrain import steps
    from kubetrain.config import config_from_json
    from kubetrain.kfp_outputs import persist
    from kubetrain.logs import setup_logging

    setup_logging()
    info = steps.quantize(
        config_from_json(config_json),
        dataset_dir=Path(dataset.path),
        model_dir=Path(model.path),
        out_dir=Path(quantized.path),
    )
    quantized.metadata.update(
        {"method": info["method"], "candidate": info["name"], "decision": info["decision"]}
    )
    for key in ("size_bytes", "fp32_size_bytes", "val_accuracy", "latency_ms_b64"):
        if info.get(key) is not None:
            quant_metrics.log_metric(key, info[key])
    persist(quant_metrics)
