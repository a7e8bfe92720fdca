from __future__ import annotations

import pytest
import yaml

from kubetrain.core.config import parse_override
from kubetrain.core.errors import ConfigError
from kubetrain.pipeline.config import PipelineConfig, config_from_json, load_config


def test_bundled_defaults_need_no_file():
    cfg = load_config()
    assert cfg.data.source == "digits"
    assert cfg.train.batch_size % (cfg.train.world_size * cfg.train.grad_accum_steps) == 0
    assert cfg.tune.enabled and cfg.tune.algorithm == "tpe"


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("train.lr=1e-3", "train.lr", 1e-3),
        ("tune.enabled=false", "tune.enabled", False),
        ("model.hidden_sizes=[32, 16]", "model.hidden_sizes", [32, 16]),
        ("data.source=path/to/x.csv", "data.source", "path/to/x.csv"),
        ("data.label_column=", "data.label_column", ""),
    ],
    ids=["float", "bool", "list", "string", "empty"],
)
def test_override_values_are_yaml_scalars(text, key, value):
    assert parse_override(text) == (key, value)


def test_overrides_apply_over_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.5\n")
    cfg = load_config(path, ["train.lr=0.25", "tune.parameters.0.feasibleSpace.min=0.002"])
    assert (cfg.train.epochs, cfg.train.lr) == (7, 0.25)
    assert cfg.tune.parameters[0].feasibleSpace.min == 0.002


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.lr=-1"], "train.lr: Input should be greater than 0"),
        (["train.lr=abc"], "train.lr: Input should be a valid number"),
        (["train.nope=1"], "train.nope: no such field"),
        (["train.optimizer=lamb"], "train.optimizer: Input should be 'adam'"),
        (["tune.algorithm=enas"], "tune.algorithm: Katib algorithm 'enas' has no local equivalent"),
        (["train.batch_size=63"], "must be divisible by nnodes*nproc*grad_accum_steps"),
        (["tune.parameters.0.name=train.nope"], "tune.parameters.0.name: 'train.nope' is not"),
        (["tune.parameters.5.name=x"], "tune.parameters.5: no such list index"),
        (["evaluate.min_accuracy=2"], "evaluate.min_accuracy: Input should be less than"),
        (["trainlr"], "expected KEY=VALUE"),
    ],
    ids=[
        "negative",
        "not-a-number",
        "unknown",
        "bad-enum",
        "no-local-algo",
        "batch",
        "param",
        "index",
        "bar",
        "no-equals",
    ],
)
def test_invalid_config_names_the_field_in_one_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    message = str(info.value)
    assert message.startswith("config error: ")
    assert expected in message
    assert "\n" not in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("train: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("trian:\n  epochs: 3\n", "trian: unknown field"),
    ],
    ids=["syntax", "list", "typo-section"],
)
def test_bad_config_file(tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")


def test_grid_needs_a_step_for_doubles():
    with pytest.raises(ConfigError, match="grid search needs feasibleSpace.step"):
        load_config(overrides=["tune.algorithm=grid", "tune.parameters.0.feasibleSpace.step=null"])


def test_grid_values_follow_katib():
    cfg = load_config()
    lr, wd = cfg.tune.parameters
    assert lr.grid_values() == [0.001, 0.004, 0.007, 0.01]
    assert wd.grid_values() == [0.0, 1e-4, 1e-3]


def test_section_slices_round_trip():
    cfg = load_config(overrides=["train.epochs=3", "data.seed=5"])
    sliced = config_from_json(cfg.sections_json("data", "train"))
    assert sliced.train == cfg.train and sliced.data == cfg.data
    assert sliced.quantize == PipelineConfig().quantize  # untouched sections take defaults


def test_show_yaml_reloads_to_the_same_config(tmp_path):
    cfg = load_config(overrides=["train.epochs=4", "model.name=cnn"])
    path = tmp_path / "shown.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert yaml.safe_load(cfg.to_yaml())["model"]["name"] == "cnn"


def test_with_params_validates():
    cfg = load_config()
    assert cfg.with_params({"train.lr": 0.5}).train.lr == 0.5
    with pytest.raises(ConfigError, match="train.lr"):
        cfg.with_params({"train.lr": -1})


def test_bundled_recipes_load_by_name_and_an_unknown_name_lists_them():
    from kubetrain.core.errors import ConfigError
    from kubetrain.pipeline.config import recipes

    text = {"text-classification", "translation", "summarization"}
    assert {"gpu", "smoke", "translation-gpu", "vision-gpu"} | text <= set(recipes())
    assert recipes() == sorted(recipes())
    for name in text:  # they validate (running them takes minutes: README, Language)
        assert load_config(name).data.task in ("text_classification", "seq2seq")
    smoke = load_config("smoke")
    assert smoke.tune.max_trials == 2 and smoke.evaluate.min_accuracy == 0.5
    gpu = load_config("gpu", overrides=["train.nnodes=1"])
    assert gpu.cluster.num_gpus == 1 and gpu.train.precision == "bf16" and gpu.train.nnodes == 1
    for name in ("detection", "detection-gpu"):
        det = load_config(name)
        assert det.data.task == "detection" and det.evaluate.primary_metric("detection") in (
            "map",
            "map_50",
        )
    with pytest.raises(ConfigError, match=r"nope: no such file \(bundled recipes: "):
        load_config("nope")


def _sections(model: type, where: str = ""):
    """Every config model reachable from ``model``, with its dotted place in the tree."""
    from pydantic import BaseModel

    yield where, model
    for name, info in model.model_fields.items():
        for kind in (info.annotation, *getattr(info.annotation, "__args__", ())):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from _sections(kind, f"{where}{name}.")


def test_every_config_field_has_a_description():
    missing = [
        f"{where}{name}"
        for where, model in _sections(PipelineConfig)
        for name, info in model.model_fields.items()
        if not (info.description or "").strip()
    ]
    assert missing == []


def test_each_section_lives_beside_its_package_and_derives_from_the_base():
    from kubetrain.core.config import Section

    owners = {
        "data": "kubetrain.data.config", "model": "kubetrain.models.config",
        "train": "kubetrain.train.config", "tune": "kubetrain.tune.config",
        "quantize": "kubetrain.quantize.config", "evaluate": "kubetrain.evaluate.config",
        "cluster": "kubetrain.launch.config", "retrain": "kubetrain.registry.config",
    }  # fmt: skip
    for section, module in owners.items():
        model = PipelineConfig.model_fields[section].annotation
        assert (model.__module__, issubclass(model, Section)) == (module, True), section


def test_loading_a_config_imports_neither_torch_nor_numpy():
    import subprocess
    import sys

    code = (
        "import sys; from kubetrain.pipeline.config import load_config; load_config(None, "
        "['tune.algorithm=grid', 'tune.parameters.0.feasibleSpace.step=0.003']); "
        "print(sorted(m for m in ('torch', 'numpy', 'optuna', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
