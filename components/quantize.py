from kfp import dsl

from kubetrain.images import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def quantize(config_json: str, model: dsl.Input[dsl.Model], quantized: dsl.Output[dsl.Model]):
    """fp32 -> int8 with torchao; the artifact reloads in a fresh process."""
    from pathlib import Path

    from kubetrain import steps
    from kubetrain.config import config_from_json
    from kubetrain.logs import setup_logging

    setup_logging()
    info = steps.quantize(config_from_json(config_json), Path(model.path), Path(quantized.path))
    quantized.metadata.update({"method": info["method"], "size_bytes": info["size_bytes"]})
