"""The ``tracking`` config section (composed into ``PipelineConfig`` by ``kubetrain.pipeline.config``)."""

from __future__ import annotations

import importlib.util

from pydantic import Field, field_validator

from kubetrain.core.config import Section


class TrackingConfig(Section):
    """Where runs are tracked: an MLflow tracking server (optional)."""

    mlflow_uri: str = Field(
        "",
        description="MLflow tracking URI (http://host:5000, or a local mlruns path); empty: no "
        "tracking. Needs the tracking extra: pip install 'kubetrain[tracking]'.",
    )
    experiment: str = Field(
        "kubetrain", min_length=1, description="MLflow experiment of the runs (created if missing)."
    )
    registered_model: str = Field(
        "kubetrain",
        min_length=1,
        description="Registered model whose new version a promoted model becomes.",
    )

    @field_validator("mlflow_uri")
    @classmethod
    def _mlflow_installed(cls, uri: str) -> str:
        if uri.strip() and importlib.util.find_spec("mlflow") is None:
            raise ValueError(
                "mlflow is not installed: pip install 'kubetrain[tracking]', or unset it"
            )
        return uri.strip()
