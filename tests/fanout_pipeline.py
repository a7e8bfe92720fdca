"""The pipeline's preprocess tasks alone, wired as ``kubetrain.pipelines.training`` wires them
(run-params, then preprocess or plan -> ParallelFor of convert -> merge), run under kfp.local.

(No ``from __future__ import annotations``: KFP reads the pipeline function's annotations.)"""

from pathlib import Path

from kfp import dsl, local

from kubetrain.pipeline.config import PipelineConfig


def preprocess_pipeline(cfg: PipelineConfig):
    """A ``@dsl.pipeline`` of ``cfg``'s first tasks whose output is the dataset artifact."""
    from kubetrain.pipelines import training

    @dsl.pipeline(name="preprocess-only")
    def only_preprocess() -> dsl.Dataset:
        params = training._run_params(cfg, "", "", 0, 0, {})
        return training._preprocess(cfg, params).outputs["dataset"]

    return only_preprocess


def run_preprocess(cfg: PipelineConfig, root: Path) -> Path:
    """Run it under kfp.local with its cache in ``root``; the dataset artifact's directory."""
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp"),
        enable_caching=True, cache_root=str(root / "cache"),
    )  # fmt: skip
    return Path(preprocess_pipeline(cfg)().output.path)
