"""The base of every config section: strict models that name the dotted field on a mistake.

It lives apart from ``kubetrain.pipeline.config`` so that each package's section model (``data/config.py``,
``train/config.py``, ...) can derive from it without importing the module that composes them.
Rules that hold for every field of every section belong on ``Section``.
"""

from __future__ import annotations

import contextlib
import json
import math
import types
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from kubetrain.core.errors import ConfigError

S = TypeVar("S", bound="Section")


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
        annotation = cls.model_fields[str(info.field_name)].annotation
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

    @classmethod
    def validated(cls: type[S], data: Any) -> S:
        """Validate a plain dict (sections missing: their defaults) into this model.

        Raises:
            ConfigError: one line naming every dotted field that is wrong.
        """
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("config error: the config must be a mapping of sections")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err)) from None

    @classmethod
    def from_json(cls: type[S], text: str) -> S:
        """Inverse of ``sections_json``: missing sections take their defaults."""
        return cls.validated(json.loads(text))

    def with_params(self: S, params: dict[str, Any]) -> S:
        """A copy with dotted keys (``{"train.lr": 0.01}``) set; raises ConfigError."""
        data = self.model_dump()
        for key, value in params.items():
            set_dotted(data, key, value, type(self))
        return type(self).validated(data)

    def narrowed(self, cls: type[S]) -> S:
        """The part of this config that ``cls`` (a config this one extends, e.g. the training
        run's of the pipeline's) reads: its fields only, sections narrowed alike. What a
        worker process receives."""
        return cls.model_validate(_narrow(self.model_dump(mode="json"), cls))

    def sections_json(self, *sections: str) -> str:
        """JSON of only the named sections (or dotted fields of one, ``evaluate.metric``): a
        step's inputs, so caching keys on what it uses."""
        include: dict[str, Any] = {}
        for name in sections:
            section, _, field = name.partition(".")
            if not field:
                include[section] = True
            elif include.get(section) is not True:
                include.setdefault(section, {})[field] = True
        return json.dumps(self.model_dump(mode="json", include=include), sort_keys=True)


def _narrow(data: dict[str, Any], cls: type[BaseModel]) -> dict[str, Any]:
    out = {}
    for name, field in cls.model_fields.items():
        if name not in data:
            continue
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(data[name], dict):
            out[name] = _narrow(data[name], sub)
        else:
            out[name] = data[name]
    return out


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


def set_dotted(
    data: dict[str, Any], key: str, value: Any, schema: type[BaseModel] | None = None
) -> None:
    """Set ``key`` (``train.lr``, ``tune.parameters.0.name``) in nested dicts and lists;
    raises ConfigError naming the first part that does not exist.

    With ``schema`` (the model ``data`` is a dump of), a key inside a free-form mapping field
    (``model.kwargs.dropout``, ``data.storage_options.client_kwargs.region_name``) is added
    when it is not there yet: those mappings take any key, where a section's fields are fixed.
    """
    parts = key.split(".")
    node: Any = data
    model: Any = schema  # the section ``node`` is a dump of; None once inside a free mapping
    free = False
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"config error: {where}: no such list index")
            part = int(part)  # type: ignore[assignment]
        elif isinstance(node, dict) and free and part not in node:
            node[part] = value if last else {}
        elif not isinstance(node, dict) or part not in node:
            raise ConfigError(f"config error: {where}: no such field")
        if last:
            node[part] = value
        else:
            model, free = _inner(model, part, free)
            node = node[part]


def _inner(model: Any, part: str | int, free: bool) -> tuple[Any, bool]:
    """The schema one step down from ``model`` at ``part``, and whether that is a free-form
    mapping (``dict[str, Any]`` field) or inside one."""
    if free:
        return None, True
    if isinstance(part, int):  # a list of sections (tune.parameters.0)
        args = [a for a in get_args(model or Any) if isinstance(a, type)]
        return (args[0] if args else None), False
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None, False
    field = model.model_fields.get(part)
    if field is None:
        return None, False
    for kind in _union_members(field.annotation):
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            return kind, False
        if kind is dict or get_origin(kind) is dict:
            return None, True
        if get_origin(kind) is list:
            return kind, False
    return None, False


def format_validation_error(err: ValidationError) -> str:
    """``config error: train.lr: Input should be greater than 0 (got -1)``; every error, one line."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        given = e.get("input")
        if e["type"] not in ("extra_forbidden", "missing") and not isinstance(given, (dict, list)):
            msg += f" (got {given!r})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "config error: " + "; ".join(parts)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in YAML names the same key twice (PyYAML would keep the last silently)."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key '{key}' on line {line} (first on line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys in a mapping (merge keys ``<<`` allowed)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise DuplicateKeyError(key, line, first[key])
                first[key] = line
            except TypeError:  # an unhashable key: the base constructor says so
                pass
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises DuplicateKeyError for a key given twice in a mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is parsed as a YAML scalar (``1e-3``, ``true``, ``[1, 2]``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"config error: --set {text!r}: expected KEY=VALUE, e.g. train.lr=0.01")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except DuplicateKeyError as err:
        raise ConfigError(f"config error: --set {text!r}: duplicate key '{err.key}'") from None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.strip().lower() not in ("nan", "inf", "-inf"):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads "1e-3" as a string
            value = float(value)
    return key.strip(), value
