"""Pipeline wiring (installed as ``kubetrain.pipelines``)."""

from kubetrain.pipelines.training import PIPELINE_NAME, build_pipeline

__all__ = ["PIPELINE_NAME", "build_pipeline"]
