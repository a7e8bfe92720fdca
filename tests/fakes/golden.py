"""Golden files under tests/assets: compared against, rewritten with KUBETRAIN_UPDATE_GOLDEN=1."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

ASSETS = Path(__file__).parents[1] / "assets"


def golden(name: str, data: dict) -> dict:
    """The golden file's content; KUBETRAIN_UPDATE_GOLDEN=1 rewrites it from ``data``."""
    path = ASSETS / name
    if os.environ.get("KUBETRAIN_UPDATE_GOLDEN"):
        path.write_text(yaml.safe_dump(data, sort_keys=False, width=100))
    return yaml.safe_load(path.read_text())
