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


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def preprocess_plan(config_json: str, overrides: str, plan: dsl.Output[dsl.Artifact]):
    """List the source, draw the split and fix every shard and each convert task's range of them.

    Args:
        config_json: the config sections this step uses (JSON), fixed at compile time.
        overrides: the run's overrides of those sections (JSON), from the params task.
        plan: the plan (the kind's listing or tokenizer, and plan.json).
    """
    from pathlib import Path

    from kubetrain.core.logs import setup_logging
    from kubetrain.pipeline import steps
    from kubetrain.pipeline.config import config_from_json
    from kubetrain.pipeline.params import apply_overrides

    setup_logging()
    record = steps.preprocess_plan(
        config_from_json(apply_overrides(config_json, overrides)), out_dir=Path(plan.path)
    )
    plan.metadata.update({"fingerprint": record.fingerprint, "shards": len(record.slots)})


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def preprocess_convert(task: int, plan: dsl.Input[dsl.Artifact], part: dsl.Output[dsl.Dataset]):
    """Decode or tokenize one contiguous range of the plan's shards.

    The config is the plan's (the data section with the run's overrides): a task output given
    as a parameter inside a ParallelFor arrives as the loop item under kfp.local 2.17.

    Args:
        task: which convert task this is (0-based): the plan's range of that number.
        plan: the plan task's output.
        part: the range's shards (unless data.shard_store holds them) and part.json.
    """
    from pathlib import Path

    from kubetrain.core.logs import setup_logging
    from kubetrain.pipeline import steps

    setup_logging()
    record = steps.preprocess_convert(plan_dir=Path(plan.path), task=task, out_dir=Path(part.path))
    part.metadata.update({"task": task, "shards": len(record.slots)})


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def preprocess_merge(
    plan: dsl.Input[dsl.Artifact],
    parts: dsl.Input[list[dsl.Dataset]],
    dataset: dsl.Output[dsl.Dataset],
):
    """Check every range is there; write the manifest, the statistics and the dataset's version.

    Args:
        plan: the plan task's output (its config is the one merge reads).
        parts: every convert task's output (dsl.Collected).
        dataset: the versioned dataset artifact, as the one-task preprocess writes it.
    """
    from pathlib import Path

    from kubetrain.core.logs import setup_logging
    from kubetrain.pipeline import steps

    setup_logging()
    meta = steps.preprocess_merge(
        plan_dir=Path(plan.path),
        part_dirs=[Path(p.path) for p in parts],
        out_dir=Path(dataset.path),
    )
    dataset.metadata.update({"version": meta.version, "source": meta.source, "sizes": meta.sizes})
