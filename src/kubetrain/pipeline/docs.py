"""The configuration reference (``docs/configuration.md``), generated from the config models.

Every field of every section carries a description where it is declared (each section's model
lives beside its owner). This module walks the composed ``PipelineConfig`` and writes, per section,
the model's docstring and one table row per field (dotted name, type, default, description),
nested sections included (``data.tokenizer.*``, ``cluster.steps.*``, ``tune.parameters[]``). The
page is a rendering of the code: a unit test compares the committed page with what this makes,
so the reference cannot drift from the models (``kubetrain config docs -o docs/configuration.md``,
``make docs``).
"""

from __future__ import annotations

import inspect
import re
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from kubetrain.pipeline.config import PipelineConfig

# The sections in the order the pipeline uses them; a section missing here is appended.
SECTION_ORDER = (
    "data",
    "model",
    "train",
    "tune",
    "quantize",
    "evaluate",
    "cluster",
    "retrain",
    "tracking",
)

INTRO = """\
# Configuration reference

<!-- Generated from the config models by `kubetrain config docs` (`make docs`). Do not edit:
change a field's description in its model and regenerate. -->

Every setting of a run is a field of one validated tree, `PipelineConfig`
(`kubetrain.pipeline.config`), composed of the sections below; each section's model lives beside
the code that owns it. The bundled defaults need no file. A YAML file or a bundled recipe
(`--config`) and `--set KEY=VALUE` overrides (values parsed as YAML) refine them, in that order:

```bash
kubetrain config show --config smoke --set train.epochs=5   # the effective config, as YAML
kubetrain run --config my.yaml --set model.name=cnn
```

Unknown fields are errors, and nothing is converted without a word: `true` is not a number, `1`
is not a switch, `inf` and `nan` are refused anywhere. A mistake is one line naming the dotted
field, exit code 2 (`config error: train.lr: Input should be greater than 0 (got -1)`).

How to read the tables: *field* is the dotted name `--set` takes (`*` stands for any of a
section's entries, `[]` for an entry of a list: `--set tune.parameters.0.name=train.lr`);
*default* is written as YAML; *null* means unset.

Environment variables do not configure what a run computes. Those kubetrain reads:
`KUBETRAIN_IMAGE` (the default image when a pipeline is compiled or a job built;
`cluster.image` wins over it), `KUBETRAIN_CONFIG` and `KUBETRAIN_CHECKPOINT_DIR` (how a job's
pods receive their config and checkpoint directory from the launcher; `train.checkpoint_dir`
wins over the latter), `KUBETRAIN_PROGRESS=0` (no terminal progress bar) and
`KUBETRAIN_CACHE_DIR` (where built-in image sets are converted once; default
`~/.cache/kubetrain`). Object-storage credentials come from the usual variables of s3fs and
gcsfs (`AWS_ACCESS_KEY_ID`, `GOOGLE_APPLICATION_CREDENTIALS`, ...).
"""


@dataclass(frozen=True)
class FieldDoc:
    """One row of the reference: a field under its dotted name."""

    path: str
    type: str
    default: str
    description: str


@dataclass
class SectionDoc:
    """One table of the reference: a config model at a dotted path, its fields, and the nested
    models below it (documented after it)."""

    path: str
    model: type[BaseModel]
    fields: list[FieldDoc] = field(default_factory=list)
    children: list[SectionDoc] = field(default_factory=list)

    @property
    def heading(self) -> str:
        """The section's heading text (its anchor is ``anchor(heading)``)."""
        return f"`{self.path}` ({self.model.__name__})"

    def walk(self) -> list[SectionDoc]:
        """This section and every nested one, in the order the page shows them."""
        return [self, *(d for child in self.children for d in child.walk())]


def anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped, spaces
    become hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def sections(root: type[BaseModel] = PipelineConfig) -> list[SectionDoc]:
    """The reference of ``root``'s sections, nested models included.

    Args:
        root: the composed config (``PipelineConfig``); each of its fields is a section.

    Returns:
        One ``SectionDoc`` per top-level section, in ``SECTION_ORDER``.
    """
    names = list(root.model_fields)
    ordered = [n for n in SECTION_ORDER if n in names] + [
        n for n in names if n not in SECTION_ORDER
    ]
    out = []
    for name in ordered:
        model = _model_of(root.model_fields[name].annotation)
        if model is None:
            raise TypeError(f"{root.__name__}.{name} is not a config section")
        out.append(_section(name, model))
    return out


def undescribed(docs: list[SectionDoc]) -> list[str]:
    """Dotted names of the fields that have no description (there should be none)."""
    return [f.path for top in docs for s in top.walk() for f in s.fields if not f.description]


def render(root: type[BaseModel] = PipelineConfig) -> str:
    """The whole reference page as Markdown (what ``docs/configuration.md`` holds)."""
    docs = sections(root)
    parts = [INTRO, "## Sections\n"]
    for top in docs:
        summary = _first_line(top.model)
        parts.append(f"- [`{top.path}`](#{anchor(top.heading)}): {summary}")
    parts.append("")
    for top in docs:
        for i, sec in enumerate(top.walk()):
            parts.append(_render_section(sec, level=2 if i == 0 else 3))
    return "\n".join(parts).rstrip() + "\n"


def _section(path: str, model: type[BaseModel]) -> SectionDoc:
    doc = SectionDoc(path, model)
    # Several fields of one nested model (cluster.steps' step pods, data.transforms' lists) are
    # documented once, as `<path>.*`.
    kinds: dict[tuple[type[BaseModel], bool], list[str]] = {}
    for name, info in model.model_fields.items():
        nested = _model_of(info.annotation)
        if nested is not None:
            kinds.setdefault((nested, _is_list(info.annotation)), []).append(name)
    links: dict[tuple[type[BaseModel], bool], str] = {}
    for (nested, is_list), names in kinds.items():
        sub = f"{path}.{names[0]}" if len(names) == 1 else f"{path}.*"
        child = _section(sub + ("[]" if is_list else ""), nested)
        doc.children.append(child)
        links[(nested, is_list)] = anchor(child.heading)
    for name, info in model.model_fields.items():
        nested = _model_of(info.annotation)
        link = links[(nested, _is_list(info.annotation))] if nested is not None else None
        doc.fields.append(
            FieldDoc(
                path=f"{path}.{name}",
                type=_type(info.annotation, link) + _bounds(info),
                default=_default(info),
                description=_text(info.description or ""),
            )
        )
    return doc


def _render_section(sec: SectionDoc, level: int) -> str:
    lines = [f"{'#' * level} {sec.heading}", ""]
    for paragraph in inspect.cleandoc(sec.model.__doc__ or "").split("\n\n"):
        if paragraph.strip():
            lines += [_text(paragraph), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for f in sec.fields:
        lines.append(f"| `{f.path}` | {f.type} | {f.default} | {f.description} |")
    return "\n".join(lines) + "\n"


def _first_line(model: type[BaseModel]) -> str:
    return _text(inspect.cleandoc(model.__doc__ or "").split("\n\n")[0])


def _members(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds, directly, optionally or as list entries; else None."""
    for member in _members(annotation):
        if get_origin(member) is list:
            member = get_args(member)[0]
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def _is_list(annotation: Any) -> bool:
    return any(get_origin(m) is list for m in _members(annotation))


def _type(annotation: Any, link: str | None = None) -> str:
    """A field's type in words: ``int or null``, ``one of `a`, `b```, ``list of int``."""
    members = _members(annotation)
    if len(members) > 1:
        named = [_type(m, link) for m in members if m is not type(None)]
        text = " or ".join(named)
        return text + (" or null" if type(None) in members else "")
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(_code(v) for v in args)
    if origin is list:
        if get_origin(args[0]) is Literal:
            return "list, each " + _type(args[0])
        return "list of " + _grouped(_type(args[0], link))
    if origin is dict:
        if args[1] is Any:
            return "mapping"
        return f"mapping of {_type(args[0])} to {_grouped(_type(args[1]))}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{link})" if link else annotation.__name__
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _grouped(text: str) -> str:
    return f"({text})" if " or " in text else text


# How a bound reads, by the annotated_types constraint that pydantic keeps in a field's metadata.
_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def _bounds(info: FieldInfo) -> str:
    """A field's numeric and length bounds: ``, ≥ 1, ≤ 64``."""
    out = []
    for item in info.metadata:
        for attr, sign in _BOUNDS:
            if getattr(item, attr, None) is not None:
                out.append(f"{sign} {getattr(item, attr)}")
        if getattr(item, "min_length", None) is not None:
            out.append(f"length ≥ {item.min_length}")
        if getattr(item, "max_length", None) is not None:
            out.append(f"length ≤ {item.max_length}")
    return "".join(f", {b}" for b in out)


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        # A nested section: the values that differ from its own fields' defaults.
        value = value.model_dump(mode="json", exclude_defaults=True)
        if not value:
            return "(below)"
    elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
        value = [v.model_dump(mode="json", exclude_defaults=True) for v in value]
    return _code(value)


def _code(value: Any) -> str:
    """``value`` as YAML in a code span (``|`` escaped for the table)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1_000_000)
    text = text.strip().removesuffix("...").strip()
    return "`" + text.replace("|", "\\|") + "`"


def _text(text: str) -> str:
    """Docstring or description text as one line of Markdown: reST ````x```` becomes ```x```,
    and outside code spans ``<`` and ``*`` are escaped (``<s>`` would strike text through);
    ``|`` is escaped everywhere (a table cell)."""
    text = " ".join(text.replace("``", "`").split())
    pieces = re.split(r"(`[^`]*`)", text)
    out = []
    for piece in pieces:
        if not piece.startswith("`"):
            piece = piece.replace("<", "&lt;").replace("*", "\\*")
        out.append(piece.replace("|", "\\|"))
    return "".join(out)
