"""The one place that says which image every pipeline step runs in."""

from __future__ import annotations

import os

from kubetrain import __version__

# Built from images/ (issue: container images); override for a registry of your own.
DEFAULT_RUNTIME_IMAGE = f"ghcr.io/kubetrain/kubetrain-runtime:{__version__}"


def runtime_image() -> str:
    """``KUBETRAIN_IMAGE`` if set, else the runtime image of this version."""
    return os.environ.get("KUBETRAIN_IMAGE", DEFAULT_RUNTIME_IMAGE)
