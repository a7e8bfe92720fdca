"""Models from outside kubetrain: torchvision builders, timm models, a user's own factory; plus
fine-tuning (initial weights from a file, a head resized to the data, a frozen backbone).

``model.name`` picks the kind:

- ``torchvision:<builder>``: any classification builder of ``torchvision.models``
  (``resnet18``, ``mobilenet_v3_small``, ``vit_b_16``, ...), built with ``model.kwargs`` and the
  dataset's number of classes;
- ``timm:<name>``: a timm model (the ``timm`` extra), with ``in_chans`` and ``num_classes``;
- ``package.module:factory``: ``factory(spec: InputSpec, num_classes: int, **model.kwargs)``
  returns an ``nn.Module``. The module must be importable wherever the model is rebuilt
  (torchrun workers, search trials, quantize, evaluate, cluster pods): installed in the
  environment, or, on a cluster, in an image built ``FROM`` the runtime image with
  ``pip install`` of the user's package.

Hub weights are never downloaded at run time: asking a builder for them (``model.kwargs.weights``,
``pretrained``) is refused unless torch's hub cache already holds the file; ``model.weights``
names a local path or URI instead. Like the rest of ``kubetrain.models``, nothing here knows of
distribution.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from kubetrain.core.errors import ConfigError
from kubetrain.models.config import BUILTIN, ModelConfig, family_of

log = logging.getLogger(__name__)

WEIGHTS_HINT = (
    "kubetrain downloads no weights at run time: save them once where the run can read them and "
    "pass model.weights (a local path or URI of a state dict or .safetensors file)"
)


@dataclass(frozen=True)
class InputSpec:
    """What a factory needs to know about the input: its shape without the batch dimension
    (``[C, H, W]`` for images) and its kind."""

    shape: tuple[int, ...]
    kind: str = "image"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.shape[0]


def build_model(
    cfg: ModelConfig,
    input_shape: list[int],
    num_classes: int,
    storage_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The network ``cfg`` names, for inputs of ``input_shape`` and ``num_classes`` classes,
    with ``cfg.weights`` loaded and the backbone frozen if asked.

    Args:
        cfg: the ``model`` section (a ``torchvision:``, ``timm:`` or ``module:factory`` name).
        input_shape: one input's shape, ``[C, H, W]`` for images.
        num_classes: outputs of the classification head.
        storage_options: fsspec options for a remote ``cfg.weights`` URI (``data.storage_options``).

    Returns:
        The model, in training mode.

    Raises:
        ConfigError: unknown builder or name, a module or attribute that cannot be found, hub
            weights asked for, a factory that fails or returns something else than a module,
            weights that do not fit the model.
    """
    family = family_of(cfg.name)
    if family in BUILTIN:
        raise ConfigError(f"config error: model.name: {cfg.name!r} is built by models.networks")
    kind, _, target = cfg.name.partition(":")
    if family in ("torchvision", "timm") and len(input_shape) != 3:
        raise ConfigError(
            f"config error: model.name: {cfg.name} needs image data (C,H,W); this data has "
            f"shape {list(input_shape)} (use 'mlp', or an image source: see README 'Vision')"
        )
    if family == "torchvision":
        model, head = _torchvision(target, input_shape, num_classes, dict(cfg.kwargs))
    elif family == "timm":
        model, head = _timm(target, input_shape, num_classes, dict(cfg.kwargs))
    else:
        model, head = _factory(kind, target, input_shape, num_classes, dict(cfg.kwargs))
    if cfg.weights:
        load_weights(model, cfg.weights, head, storage_options)
    if cfg.freeze_backbone:
        freeze_backbone(model, head)
    return model


def check_model_name(
    cfg: ModelConfig, image_data: bool | None, storage_options: Mapping[str, Any] | None = None
) -> None:
    """What can be said of ``cfg`` without data and without building anything: the name
    resolves (a torchvision builder, a timm model, an importable factory, an ``hf:`` directory
    with config.json), the weights file exists, and an image model gets image data. For
    ``kubetrain run``'s preflight: these failed in every training worker before.

    Args:
        cfg: the ``model`` section.
        image_data: whether the data is images (C,H,W); None: not known yet.
        storage_options: fsspec options for a remote ``cfg.weights`` or ``hf:`` URI.

    Raises:
        ConfigError: naming model.name or model.weights.
    """
    family, target = family_of(cfg.name), cfg.name.partition(":")[2]
    if family in ("torchvision", "timm") and image_data is False:
        raise ConfigError(
            f"config error: model.name: {cfg.name} needs image data (C,H,W) and this data is not "
            "images (use 'mlp' for a table, or set data.image_shape for images stored as columns)"
        )
    if family == "torchvision":
        require = "pip install 'kubetrain[vision]'"
        try:
            import torchvision
        except ImportError as err:
            raise ConfigError(f"config error: model.name: {cfg.name} needs torchvision "
                              f"({require}): {err}") from None  # fmt: skip
        known = torchvision.models.list_models(module=torchvision.models)
        if target not in known:
            raise ConfigError(
                f"config error: model.name: {target!r} is not a torchvision classification "
                f"builder{_did_you_mean(target, known)}"
            )
    elif family == "timm":
        try:
            import timm
        except ImportError:
            raise ConfigError(f"config error: model.name: {cfg.name} needs timm (pip install "
                              "'kubetrain[timm]')") from None  # fmt: skip
        if not timm.is_model(target):
            raise ConfigError(f"config error: model.name: {target!r} is not a timm model"
                              f"{_did_you_mean(target, timm.list_models())}")  # fmt: skip
    elif family == "hf":
        where = cfg.name[len("hf:") :]
        if "://" not in where or where.startswith("file://"):
            from kubetrain.models.hf import local_model_dir

            local_model_dir(cfg.name)
    elif family == "factory":
        _resolve_factory(cfg.name)
    if cfg.weights:
        import fsspec

        local = (fsspec.core.split_protocol(cfg.weights)[0] or "file") in ("file", "local")
        if local and not Path(cfg.weights.removeprefix("file://")).is_file():
            raise ConfigError(f"config error: model.weights: {cfg.weights}: no such file")


# -- torchvision --------------------------------------------------------------------------------
def _torchvision(name: str, input_shape: list[int], num_classes: int, kwargs: dict[str, Any]):
    try:
        import torchvision
    except ImportError as err:
        raise ConfigError(
            f"config error: model.name: torchvision:{name} needs torchvision "
            f"(pip install 'kubetrain[vision]'): {err}"
        ) from None
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ConfigError(
            f"config error: model.name: {name!r} is not a torchvision classification builder"
            f"{_did_you_mean(name, known)}"
        )
    hub = kwargs.pop("weights", None)
    if kwargs.pop("pretrained", None):
        hub = hub or "DEFAULT"
    if hub is not None:
        kwargs["weights"] = _cached_hub_weights(name, hub)
    else:
        kwargs["num_classes"] = num_classes
    model = _call(torchvision.models.get_model, f"torchvision:{name}", name, **kwargs)
    head = _replace_head(model, num_classes)
    if input_shape[0] != 3:
        _adapt_input_conv(model, input_shape[0])
    return model, head


def _cached_hub_weights(builder: str, value: Any):
    """A torchvision weights enum member whose file is already in torch's hub cache; asking
    for one that is not is refused before any download is tried."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(builder)
    member = str(value).rsplit(".", 1)[-1]
    try:
        weights = enum[member]
    except KeyError:
        raise ConfigError(
            f"config error: model.kwargs.weights: {value!r} is not one of {builder}'s weights "
            f"({', '.join(enum.__members__)})"
        ) from None
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.exists(cached):
        raise ConfigError(f"config error: model.kwargs.weights: {value!r}: {WEIGHTS_HINT}")
    return weights


def _replace_head(model: nn.Module, num_classes: int) -> str:
    """Give the model's classifier ``num_classes`` outputs; returns the classifier's name.

    The classifier is the last Linear (or the 1x1 Conv2d of SqueezeNet) in module order: the
    layout of every torchvision classification model.
    """
    name, layer = _last_classifier(model)
    if name is None or layer is None:
        raise ConfigError("config error: model.name: found no Linear classifier to resize")
    new: nn.Module
    if isinstance(layer, nn.Linear):
        if layer.out_features != num_classes:
            new = nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)
            _set_module(model, name, new)
    elif layer.out_channels != num_classes:
        size, stride = (
            cast("tuple[int, int]", layer.kernel_size),
            cast("tuple[int, int]", layer.stride),
        )
        new = nn.Conv2d(layer.in_channels, num_classes, size, stride)
        _set_module(model, name, new)
    return name


def _last_classifier(model: nn.Module) -> tuple[str | None, nn.Linear | nn.Conv2d | None]:
    found: tuple[str | None, nn.Linear | nn.Conv2d | None] = (None, None)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and "classifier" in name
        ):
            found = (name, module)
    return found


def _adapt_input_conv(model: nn.Module, channels: int) -> None:
    """Let a 3-channel stem take ``channels`` (grayscale: 1); pretrained filters are summed over
    their colour channels, so a gray image gives the response of the same image in colour."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(
                channels,
                module.out_channels,
                cast("tuple[int, int]", module.kernel_size),
                cast("tuple[int, int]", module.stride),
                cast("str | tuple[int, int]", module.padding),
                cast("tuple[int, int]", module.dilation),
                module.groups,
                module.bias is not None,
            )
            with torch.no_grad():
                summed = module.weight.sum(dim=1, keepdim=True)
                new.weight.copy_(summed.repeat(1, channels, 1, 1) / channels)
                if module.bias is not None and new.bias is not None:
                    new.bias.copy_(module.bias)
            _set_module(model, name, new)
            return
    raise ConfigError(f"config error: model.name: no 3-channel input layer to adapt to {channels}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# -- timm ---------------------------------------------------------------------------------------
def _timm(name: str, input_shape: list[int], num_classes: int, kwargs: dict[str, Any]):
    try:
        import timm
    except ImportError:
        raise ConfigError(
            f"config error: model.name: timm:{name} needs timm (pip install 'kubetrain[timm]')"
        ) from None
    if kwargs.pop("pretrained", False) or kwargs.get("pretrained_cfg_overlay"):
        raise ConfigError(f"config error: model.kwargs.pretrained: {WEIGHTS_HINT}")
    if not timm.is_model(name):
        raise ConfigError(
            f"config error: model.name: {name!r} is not a timm model"
            f"{_did_you_mean(name, timm.list_models())}"
        )
    model = _call(
        timm.create_model,
        f"timm:{name}",
        name,
        pretrained=False,
        num_classes=num_classes,
        in_chans=input_shape[0],
        **kwargs,
    )
    head, _ = _last_classifier(model)
    return model, head


# -- package.module:factory ---------------------------------------------------------------------
def _factory(
    module_name: str, attr: str, input_shape: list[int], num_classes: int, kwargs: dict[str, Any]
):
    spec = InputSpec(tuple(int(d) for d in input_shape))
    model = call_factory(f"{module_name}:{attr}", spec, num_classes, **kwargs)
    head, _ = _last_classifier(model)
    return model, head


def call_factory(name: str, *args: Any, **kwargs: Any) -> nn.Module:
    """Import ``package.module:factory`` and call it with ``args`` and ``kwargs`` (the image and
    the text tasks' own-model entry point).

    Raises:
        ConfigError: the module does not import, the attribute is missing or not callable, the
            call fails, or it returns something other than an ``nn.Module``.
    """
    factory = _resolve_factory(name)
    model = _call(factory, name, *args, **kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"config error: model.name: {name} returned a {type(model).__name__}, not a "
            "torch.nn.Module"
        )
    return model


def _resolve_factory(name: str):
    """The callable ``package.module:factory`` names (imported, not called).

    Raises:
        ConfigError: the module does not import, or the attribute is missing or not callable.
    """
    module_name, attr = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"config error: model.name: cannot import module {module_name!r} ({err}); install "
            "the package that defines it where the model is built (and in the image)"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        what = "no attribute" if factory is None else "a non-callable attribute"
        raise ConfigError(f"config error: model.name: module {module_name!r} has {what} {attr!r}")
    return factory


def _call(fn, where: str, *args: Any, **kwargs: Any):
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config error: model: {where} with kwargs {kwargs}: {message}") from None


def _did_you_mean(name: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


# -- weights and freezing -----------------------------------------------------------------------
def read_state_dict(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save``d one (tensors only: loaded
    with ``weights_only=True``), local or any fsspec URI. A checkpoint that wraps it
    (``{"state_dict": ...}``, ``{"model": ...}``) and DDP's ``module.`` prefixes are unwrapped.

    Raises:
        ConfigError: the file is missing or is not a state dict (one line naming it).
    """
    import fsspec

    try:
        local = (fsspec.core.split_protocol(uri)[0] or "file") in ("file", "local")
        options = {} if local else dict(storage_options or {})
        with fsspec.open(uri, "rb", **options) as f:
            data = f.read()
    except (FileNotFoundError, OSError) as err:
        raise ConfigError(f"config error: model.weights: {uri}: cannot read ({err})") from None
    try:
        if uri.lower().endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # any decoder's failure is the same user mistake: not weights
        raise ConfigError(
            f"config error: model.weights: {uri}: not a state dict ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = cast("dict[str, torch.Tensor]", state[key])
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"config error: model.weights: {uri}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(
    model: nn.Module,
    uri: str,
    head: str | None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Load ``uri`` into ``model`` for fine-tuning: every tensor must fit, except the head's
    (``head``: its module name), which keeps its fresh initialisation when its size differs
    (another number of classes); a 3-channel input layer is summed to fit a 1-channel model.

    Raises:
        ConfigError: keys missing or left over, or shapes that differ outside the head.
    """
    state = read_state_dict(uri, storage_options)
    own = model.state_dict()
    prefix = f"{head}." if head else None
    fitted, resized = {}, []
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            if prefix and key.startswith(prefix):
                resized.append(key)
                continue
            if value.dim() == 4 and value.shape[1] == 3 and own[key].shape[1] in (1,):
                value = value.sum(dim=1, keepdim=True)
            else:
                raise ConfigError(
                    f"config error: model.weights: {uri}: {key} has shape {tuple(value.shape)}, "
                    f"the model's is {tuple(own[key].shape)}"
                )
        fitted[key] = value
    result = model.load_state_dict(fitted, strict=False)
    missing = [k for k in result.missing_keys if k not in resized]
    if missing or result.unexpected_keys:
        which = missing[:3] or result.unexpected_keys[:3]
        what = "lacks" if missing else "has keys the model does not"
        raise ConfigError(
            f"config error: model.weights: {uri} {what}: {', '.join(which)} "
            f"({len(missing) or len(result.unexpected_keys)} in all); is it for {model.__class__.__name__}?"
        )
    if resized:
        log.info("model.weights: %s: head %s re-initialised for the data's classes", uri, head)


def freeze_backbone(model: nn.Module, head: str | None) -> None:
    """Only the head's parameters keep ``requires_grad``.

    Raises:
        ConfigError: the model has no head kubetrain can find (a factory without a Linear).
    """
    if not head:
        raise ConfigError(
            "config error: model.freeze_backbone: the model has no Linear classifier to keep"
        )
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(f"{head}.")
