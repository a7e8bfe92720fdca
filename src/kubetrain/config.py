"""One validated configuration tree for the whole pipeline.

Each section's model lives beside the code that owns it, as a ``kubetrain.config_base.Section``:

    data      kubetrain.data.config.DataConfig          model     kubetrain.models.config.ModelConfig
    train     kubetrain.train.config.TrainConfig        tune      kubetrain.tune.config.TuneConfig
    quantize  kubetrain.quantize.config.QuantizeConfig  evaluate  kubetrain.evaluate.config
    cluster   kubetrain.launch.config.ClusterConfig     retrain   kubetrain.registry.config

This module composes them into ``PipelineConfig`` and owns loading: the bundled defaults, a YAML
file or bundled recipe, and ``--set a.b=c`` overrides feed the same tree; a mistake is reported
as one line that names the dotted field (``train.lr: Input should be greater than 0``). None of
these modules imports torch: loading a config stays cheap.

Environment variables. Every knob is a config field, with these exceptions, each for a reason:

- ``KUBETRAIN_IMAGE``: an override of the default image (the runtime image of this version),
  read when a pipeline is *compiled* (each component names its image before any config is
  loaded) and when a job is built; ``cluster.image``, the one image setting of the steps and the
  job pods alike, wins over it.
- ``KUBETRAIN_CONFIG`` (``--config-env``): how a TrainJob, PyTorchJob or Katib trial pod receives
  its config: the pod's input, not a setting.
- ``KUBETRAIN_CHECKPOINT_DIR``: how a job pod receives its checkpoint directory on the
  shared volume (per job, chosen by the launcher); ``train.checkpoint_dir`` overrides it.
- ``KUBETRAIN_PROGRESS=0``: no terminal progress bar. A choice of the terminal, not of the run:
  it changes nothing that is computed, and as a field it would change the steps' cache keys.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from kubetrain.config_base import Section
from kubetrain.data.config import DataConfig
from kubetrain.errors import ConfigError
from kubetrain.evaluate.config import EvaluateConfig
from kubetrain.launch.config import ClusterConfig, Toleration
from kubetrain.models.config import ModelConfig
from kubetrain.quantize.config import QuantizeConfig
from kubetrain.registry.config import RetrainConfig
from kubetrain.tracking.config import TrackingConfig
from kubetrain.train.config import TrainConfig
from kubetrain.tune.config import (
    EarlyStopping,
    FeasibleSpace,
    SearchParameter,
    TuneConfig,
    check_searchable_on,
)

# The base of every section, under the name it had when the sections were defined here.
_Section = Section

__all__ = [
    "SECTIONS",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "EarlyStopping",
    "EvaluateConfig",
    "FeasibleSpace",
    "ModelConfig",
    "PipelineConfig",
    "QuantizeConfig",
    "RetrainConfig",
    "SearchParameter",
    "Section",
    "Toleration",
    "TrainConfig",
    "TuneConfig",
    "config_from_json",
    "load_config",
    "parse_override",
    "recipes",
    "validate_config",
]

SECTIONS = ("data", "model", "train", "tune", "quantize", "evaluate", "cluster", "retrain")


class PipelineConfig(Section):
    """The whole pipeline's configuration."""

    data: DataConfig = Field(default_factory=DataConfig, description=DataConfig.__doc__)
    model: ModelConfig = Field(default_factory=ModelConfig, description=ModelConfig.__doc__)
    train: TrainConfig = Field(default_factory=TrainConfig, description=TrainConfig.__doc__)
    tune: TuneConfig = Field(default_factory=TuneConfig, description=TuneConfig.__doc__)
    quantize: QuantizeConfig = Field(
        default_factory=QuantizeConfig, description=QuantizeConfig.__doc__
    )
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig, description=EvaluateConfig.__doc__
    )
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig, description=(ClusterConfig.__doc__ or "").split("\n")[0]
    )
    retrain: RetrainConfig = Field(default_factory=RetrainConfig, description=RetrainConfig.__doc__)
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description=TrackingConfig.__doc__
    )

    @model_validator(mode="after")
    def _search_space_names_config(self) -> PipelineConfig:
        dumped = self.model_dump()
        for i, param in enumerate(self.tune.parameters):
            where = f"tune.parameters.{i}.name"
            section = param.name.split(".")[0]
            if section not in ("data", "model", "train", "quantize") or "." not in param.name:
                raise ValueError(
                    f"{where}: '{param.name}' must name a field of data, model, train "
                    "or quantize (e.g. train.lr)"
                )
            try:
                _set_dotted(dumped, param.name, _sample_value(param))
            except ConfigError:
                raise ValueError(f"{where}: '{param.name}' is not a config field") from None
            try:
                type(getattr(self, section)).model_validate(dumped[section])
            except ValidationError as err:
                raise ValueError(f"{where}: '{param.name}': {err.errors()[0]['msg']}") from None
        check_searchable_on(self.cluster.backend, self.tune)
        if self.tune.enabled and self.tune.algorithm == "grid":
            for param in self.tune.parameters:
                param.grid_values()
        gpus = self.cluster.num_gpus
        if gpus and self.train.nproc != gpus:
            raise ValueError(
                f"train.nproc ({self.train.nproc}) must equal cluster.num_gpus ({gpus}): "
                "one process per GPU"
            )
        return self

    def with_params(self, params: dict[str, Any]) -> PipelineConfig:
        """Return a copy with dotted keys (``{"train.lr": 0.01}``) set; raises ConfigError."""
        data = self.model_dump()
        for key, value in params.items():
            _set_dotted(data, key, value)
        return validate_config(data)

    def model_inputs_json(self, *sections: str) -> str:
        """Like ``sections_json``, without the train fields that do not change the result: what
        ``kubetrain.registry.model_inputs_fingerprint`` hashes."""
        exclude = {"train": set(TrainConfig.RUN_ONLY_FIELDS)} if "train" in sections else None
        data = self.model_dump(mode="json", include=set(sections), exclude=exclude)
        return json.dumps(data, sort_keys=True)

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

    def to_yaml(self) -> str:
        """The whole config as YAML (what ``kubetrain config show`` prints; loads back)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _sample_value(param: SearchParameter) -> Any:
    space = param.feasibleSpace
    if space.list:
        return space.list[0]
    return int(space.min) if param.parameterType == "int" else space.min


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"config error: {where}: no such list index")
            part = int(part)  # type: ignore[assignment]
        elif not isinstance(node, dict) or part not in node:
            raise ConfigError(f"config error: {where}: no such field")
        if last:
            node[part] = value
        else:
            node = node[part]


def _format_validation_error(err: ValidationError) -> str:
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


def validate_config(data: Any) -> PipelineConfig:
    """Validate a plain dict into a PipelineConfig; raises ConfigError with the dotted field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config error: the config must be a mapping of sections")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


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


RECIPES = Path(__file__).parent / "recipes"


def recipes() -> list[str]:
    """Names of the bundled recipes (``--config NAME``): configs for common runs."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    """Load the bundled defaults, then ``path`` (YAML, or the name of a bundled recipe), then
    ``--set`` overrides, and validate.

    Raises ConfigError (one line naming the file or the dotted field) on any problem.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file() and str(path) in recipes():
            path = RECIPES / f"{path}.yaml"
        if path.is_dir():
            raise ConfigError(f"config error: {path}: is a directory, not a YAML config file")
        if not path.is_file():
            raise ConfigError(
                f"config error: {path}: no such file (bundled recipes: {', '.join(recipes())})"
            )
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"config error: {path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                f"offset {err.start}); save the config as UTF-8"
            ) from None
        except OSError as err:
            raise ConfigError(f"config error: {path}: cannot read ({err.strerror})") from None
        try:
            loaded = load_yaml(text)
        except DuplicateKeyError as err:
            raise ConfigError(
                f"config error: {path}:{err.line}: duplicate key '{err.key}' (first on line "
                f"{err.first_line})"
            ) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"config error: {where}: not valid YAML") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config error: {path}: the top level must be a mapping of sections")
        data = loaded or {}
    base = validate_config(data)
    if not overrides:
        return base
    merged = base.model_dump()
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(merged, key, value)
    return validate_config(merged)


def config_from_json(text: str) -> PipelineConfig:
    """Inverse of ``sections_json``: missing sections take their defaults."""
    return validate_config(json.loads(text))
