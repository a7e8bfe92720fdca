"""Model zoo: small networks built from a name and the data's shape. Knows nothing of distribution.

``networks`` builds them (and imports torch); ``config`` is the ``model`` config section. The
names below are loaded on first use, so that importing the config section stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["REGISTRY", "build_from_spec", "build_model", "model_spec"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kubetrain.models import networks

        return getattr(networks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
