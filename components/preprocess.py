from kfp import dsl

from kubetrain.launch.image import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def preprocess(config_json: str, overrides: str, dataset: dsl.Output[dsl.Dataset]):
    """Load, clean, split and normalise the data into a versioned dataset artifact.

    Args:
        config_json: the config sections this step uses (JSON), fixed at compile time.
        overrides: the run's overrides of those sections (JSON), from the params task.
        dataset: the versioned dataset artifact (arrays and metadata).
    """
    from pathlib import Path

    from kubetrain.core.logs import setup_logging
    from kubetrain.pipeline import steps
    from kubetrain.pipeline.config import config_from_json
    from kubetrain.pipeline.params import apply_overrides

    setup_logging()
    meta = steps.preprocess(
        config_from_json(apply_overrides(config_json, overrides)), out_dir=Path(dataset.path)
    )
    dataset.metadata.update({"version": meta.version, "source": meta.source, "sizes": meta.sizes})
