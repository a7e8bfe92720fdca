from kfp import dsl

from kubetrain.images import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def preprocess(config_json: str, dataset: dsl.Output[dsl.Dataset]):
    """Load, clean, split and normalise the data into a versioned dataset artifact."""
    from pathlib import Path

    from kubetrain import steps
    from kubetrain.config import config_from_json
    from kubetrain.logs import setup_logging

    setup_logging()
    meta = steps.preprocess(config_from_json(config_json), out_dir=Path(dataset.path))
    dataset.metadata.update(
        {"version": meta["version"], "source": meta["source"], "sizes": meta["sizes"]}
    )
