from kfp import dsl

from kubetrain.images import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def preprocess(config_json: str, overrides: str, dataset: dsl.Output[dsl.Dataset]):
    """Load, clean, split and normalise the data into a versioned dataset artifact."""
    from kubetrain.logs import setup_logging
    from kubetrain.params import apply_overrides
    from kubetrain.warm import run_step

    setup_logging()
    meta = run_step("preprocess", apply_overrides(config_json, overrides), out_dir=dataset.path)
    dataset.metadata.update(
        {"version": meta["version"], "source": meta["source"], "sizes": meta["sizes"]}
    )
