"""Data: sources, the versioned dataset artifact, augmentation and loaders.

``config`` is the ``data`` config section. The names below are loaded on first use, so that
importing the config section does not import the data code (numpy, pandas, the sources).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DatasetArtifact", "build_dataset", "load_dataset"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kubetrain.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
