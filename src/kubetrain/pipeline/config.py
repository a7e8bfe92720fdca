"""One validated configuration tree for the whole pipeline, and how it is loaded.

Each section's model lives beside the code that owns it, as a ``kubetrain.core.config.Section``:

    data      kubetrain.data.config.DataConfig          model     kubetrain.models.config.ModelConfig
    train     kubetrain.train.config.TrainConfig        tune      kubetrain.tune.config.TuneConfig
    quantize  kubetrain.quantize.config.QuantizeConfig  evaluate  kubetrain.evaluate.config
    cluster   kubetrain.launch.config.ClusterConfig     retrain   kubetrain.registry.config
    tracking  kubetrain.tracking.config.TrackingConfig

Each layer composes the sections it reads and extends the composition of the layer below:
``TaskConfig`` (tasks: data, model, how to score) ← ``TrainingConfig`` (train: + train) ←
``JobConfig`` (launch: + cluster) ← ``SearchConfig`` (tune: + tune, quantize) ←
``PipelineConfig`` (here: the whole evaluate section, retrain, tracking). So the one object the
pipeline loads is what every layer receives, and no layer imports the one above it.

This module owns loading: the bundled defaults, a YAML file or bundled recipe, and ``--set
a.b=c`` overrides feed the same tree; a mistake is reported as one line that names the dotted
field (``train.lr: Input should be greater than 0``). None of these modules imports torch:
loading a config stays cheap.

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

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from kubetrain.core.config import DuplicateKeyError, load_yaml, parse_override, set_dotted
from kubetrain.core.errors import ConfigError
from kubetrain.data.config import DataConfig
from kubetrain.evaluate.config import EvaluateConfig
from kubetrain.registry import MODEL_INPUT_SECTIONS
from kubetrain.registry.config import RetrainConfig
from kubetrain.tracking.config import TrackingConfig
from kubetrain.train.config import TrainConfig
from kubetrain.tune.config import SearchConfig


class PipelineConfig(SearchConfig):
    """The whole pipeline's configuration: what the search reads (the training run, where it
    runs, the search), and the sections of the steps after it."""

    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig, description=EvaluateConfig.__doc__
    )
    retrain: RetrainConfig = Field(default_factory=RetrainConfig, description=RetrainConfig.__doc__)
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description=TrackingConfig.__doc__
    )

    def model_inputs_json(self) -> str:
        """The sections that shape a trained model (``MODEL_INPUT_SECTIONS``) as JSON, without
        the train and data fields that do not change the result: what
        ``kubetrain.registry.model_inputs_fingerprint`` hashes."""
        exclude = {
            "train": set(TrainConfig.RUN_ONLY_FIELDS),
            "data": set(DataConfig.RUN_ONLY_FIELDS),
        }
        data = self.model_dump(mode="json", include=set(MODEL_INPUT_SECTIONS), exclude=exclude)
        return json.dumps(data, sort_keys=True)

    def to_yaml(self) -> str:
        """The whole config as YAML (what ``kubetrain config show`` prints; loads back)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def validate_config(data: Any) -> PipelineConfig:
    """Validate a plain dict into a PipelineConfig; raises ConfigError with the dotted field."""
    return PipelineConfig.validated(data)


RECIPES = Path(__file__).parent / "recipes"


def recipes() -> list[str]:
    """Names of the bundled recipes (``--config NAME``): configs for common runs."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def _read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in the YAML file ``path``, or in the bundled recipe of that name.

    Raises:
        ConfigError: one line naming the file (and the line, for YAML errors).
    """
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
    return loaded or {}


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    """Load the bundled defaults, then ``path`` (YAML, or the name of a bundled recipe), then
    ``--set`` overrides, and validate.

    Raises ConfigError (one line naming the file or the dotted field) on any problem.
    """
    data = _read_config_file(Path(path)) if path is not None else {}
    base = validate_config(data)
    if not overrides:
        return base
    merged = base.model_dump()
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(merged, key, value, PipelineConfig)
    return validate_config(merged)


def config_from_json(text: str) -> PipelineConfig:
    """Inverse of ``sections_json``: missing sections take their defaults."""
    return PipelineConfig.from_json(text)
