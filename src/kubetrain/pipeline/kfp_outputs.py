"""Helpers for KFP output artifacts, used inside components."""

from __future__ import annotations

import json
from pathlib import Path


def persist(artifact) -> None:
    """Write a Metrics/ClassificationMetrics artifact's metadata to its file.

    KFP keeps logged metrics in metadata only; kfp.local's cache treats an output whose file
    does not exist as missing, so without this file the task (and all after it) never hit.
    """
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(artifact.metadata, indent=2, default=str))
