"""The base of every config section: strict models that name the dotted field on a mistake.

It lives apart from ``kubetrain.config`` so that each package's section model (``data/config.py``,
``train/config.py``, ...) can derive from it without importing the module that composes them.
Rules that hold for every field of every section belong on ``Section``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
