"""The ``data`` config section: where the data comes from and how it is split, normalised and
augmented (used by ``kubetrain.data`` and the training loader)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from kubetrain.config_base import Section


class DataConfig(Section):
    """Where the data comes from and how it is split, normalised and augmented."""

    source: str = Field(
        "digits",
        description="'digits' (scikit-learn's bundled 8x8 digits), or a path/URI (fsspec) to a "
        ".csv, .parquet or .npz file; a glob pattern reads several files in parallel.",
    )
    label_column: str = Field("label", description="Label column of tabular data (CSV/Parquet).")
    image_shape: list[int] | None = Field(
        None,
        description="C,H,W of image data given as flat feature columns (digits sets it itself).",
    )
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of samples for validation.")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of samples for test.")
    normalize: Literal["standard", "minmax", "none"] = Field(
        "standard", description="Per-feature normalisation, fitted on the training split only."
    )
    augment: bool = Field(False, description="Random shifts and noise on image training data.")
    augment_shift: int = Field(1, ge=0, le=8, description="Largest random shift in pixels.")
    augment_noise: float = Field(
        0.05, ge=0, description="Std of Gaussian noise (normalised units)."
    )
    num_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Parallel workers: files read at once in preprocess, DataLoader worker "
        "processes per rank in training (0 = in the main process).",
    )
    prefetch: int = Field(
        4,
        ge=0,
        le=64,
        description="Training batches prepared ahead of the step: by a background thread when "
        "num_workers is 0 (0 = no thread), per worker process otherwise (at least 1).",
    )
    seed: int = Field(0, description="Seed of the train/val/test split.")

    @field_validator("image_shape")
    @classmethod
    def _shape_is_positive(cls, shape: list[int] | None) -> list[int] | None:
        if shape is not None and (not shape or any(v < 1 for v in shape)):
            raise ValueError("every entry must be a positive integer, e.g. [1, 28, 28] (C,H,W)")
        return shape
