"""The base of every config section: strict models that name the dotted field on a mistake.

It lives apart from ``kubetrain.pipeline.config`` so that each package's section model (``data/config.py``,
``train/config.py``, ...) can derive from it without importing the module that composes them.
Rules that hold for every field of every section belong on ``Section``.
"""

from __future__ import annotations

import math
import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class Section(BaseModel):
    """A config section: unknown fields are errors, assignments are validated, and nothing is
    converted without a word (see ``_no_quiet_conversions``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_quiet_conversions(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse what pydantic would otherwise convert without a word: ``true`` for a number
        (``train.epochs=true`` would train 1 epoch), ``1`` or ``"yes"`` for a switch, and
        inf/nan anywhere (``train.lr=.inf``, a ``.nan`` in a search-space list)."""
        annotation = cls.model_fields[info.field_name].annotation
        kinds = _union_members(annotation)
        if bool in kinds:
            if value is not None and not isinstance(value, bool):
                raise ValueError("Input should be true or false")
        elif isinstance(value, bool) and (int in kinds or float in kinds):
            raise ValueError("Input should be a number, not true/false")
        elif _bool_in_number_list(value, kinds):
            raise ValueError("Input should be a list of numbers, not true/false")
        if not _holds_section(annotation) and _non_finite(value):
            raise ValueError("Input should be a finite number (not inf or nan)")
        return value


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _bool_in_number_list(value: Any, kinds: tuple[Any, ...]) -> bool:
    numbers = any(get_origin(k) is list and get_args(k)[0] in (int, float) for k in kinds)
    return numbers and isinstance(value, list) and any(isinstance(v, bool) for v in value)


def _holds_section(annotation: Any) -> bool:
    """True if values of ``annotation`` are (or contain) config sections: they check their own
    fields, so an error names the field inside."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_section(a) for a in get_args(annotation))


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False
