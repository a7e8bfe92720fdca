"""Image transforms from the config: ``torchvision.transforms.v2`` pipelines described in YAML,
MixUp/CutMix on batches, and the per-sample callable a ``StreamingDataset`` runs in its workers.

A pipeline is a list of ``{name, kwargs}`` entries (``data.transforms.train``, ``.eval``,
``.batch``), each a class of ``torchvision.transforms.v2`` built with its keyword arguments;
lists of entries inside kwargs (``RandomApply``'s ``transforms``) are built the same way, and
``dtype``/``interpolation`` may be given as names (``float32``, ``bilinear``). A wrong name or
argument is one line naming the entry (``data.transforms.train[2]``).

The callables here are plain picklable objects holding the *specs*; the torchvision objects
are built on first use inside each DataLoader worker, so nothing heavy crosses the process
boundary and a worker start stays cheap. Needs the ``vision`` extra (torchvision).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import io
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from kubetrain.core.errors import ConfigError
from kubetrain.data.config import DataConfig, TransformSpec

SpecList = Sequence[TransformSpec | Mapping[str, Any]]


def _v2():
    try:
        from torchvision.transforms import v2
    except ImportError as err:  # one line, with the fix
        raise ConfigError(
            f"config error: image transforms need torchvision (pip install 'kubetrain[vision]'): "
            f"{err}"
        ) from None
    return v2


def _plain(specs: SpecList) -> list[dict[str, Any]]:
    return [
        s.model_dump() if isinstance(s, TransformSpec) else {"kwargs": {}, **dict(s)} for s in specs
    ]


def _is_spec_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, Mapping) and "name" in v for v in value)
    )


def _argument(key: str, value: Any, where: str, defaults: Mapping[str, Any]) -> Any:
    if _is_spec_list(value):
        return [build_one(v, f"{where}[{i}]", defaults) for i, v in enumerate(value)]
    if key == "dtype" and isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"config error: {where}: {value!r} is not a torch dtype")
        return dtype
    if key == "interpolation" and isinstance(value, str):
        from torchvision.transforms import InterpolationMode

        try:
            return InterpolationMode(value.lower())
        except ValueError:
            names = ", ".join(m.value for m in InterpolationMode)
            raise ConfigError(
                f"config error: {where}: interpolation {value!r} is not one of {names}"
            ) from None
    return value


def build_one(spec: Mapping[str, Any], where: str, defaults: Mapping[str, Any] | None = None):
    """One transform from a ``{name, kwargs}`` entry.

    Args:
        spec: ``{"name": <class of torchvision.transforms.v2>, "kwargs": {...}}``.
        where: the entry's dotted place in the config, for messages.
        defaults: keyword arguments filled in when the class takes them and the entry does not
            set them (``num_classes`` for MixUp/CutMix).

    Returns:
        The transform object.

    Raises:
        ConfigError: unknown name, or arguments the class refuses (one line naming ``where``).
    """
    v2 = _v2()
    name = str(spec.get("name", ""))
    cls = getattr(v2, name, None)
    if not (isinstance(cls, type) and issubclass(cls, v2.Transform)):
        known = [n for n in dir(v2) if isinstance(getattr(v2, n), type)]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"config error: {where}: unknown transform {name!r} "
            f"(not a class of torchvision.transforms.v2{hint})"
        )
    raw = dict(spec.get("kwargs") or {})
    kwargs = {k: _argument(k, v, f"{where}.kwargs.{k}", defaults or {}) for k, v in raw.items()}
    params = inspect.signature(cls).parameters
    for key, value in (defaults or {}).items():
        if key in params and key not in kwargs:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config error: {where} ({name}): {message}") from None


def build_pipeline(specs: SpecList, where: str, to_float: bool = True):
    """A ``v2.Compose`` of ``specs``; with ``to_float``, a ``ToDtype(float32, scale=True)`` goes
    before the first ``Normalize`` (or at the end) unless the list has a ``ToDtype``.

    Raises:
        ConfigError: an entry's name or arguments are wrong (naming ``where[i]``).
    """
    v2 = _v2()
    plain = _plain(specs)
    steps = [build_one(s, f"{where}[{i}]") for i, s in enumerate(plain)]
    if to_float and not any(s["name"] == "ToDtype" for s in plain):
        at = next((i for i, s in enumerate(plain) if s["name"] == "Normalize"), len(steps))
        steps.insert(at, v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def batch_specs(cfg: DataConfig) -> list[dict[str, Any]]:
    """The batch transforms ``cfg`` asks for: ``data.transforms.batch``, or MixUp/CutMix from
    ``data.mixup_alpha``/``data.cutmix_alpha`` (one of the two at random when both are set)."""
    specs = _plain(cfg.transforms.batch)
    short = [
        {"name": name, "kwargs": {"alpha": alpha}}
        for name, alpha in (("MixUp", cfg.mixup_alpha), ("CutMix", cfg.cutmix_alpha))
        if alpha > 0
    ]
    if len(short) == 2:
        short = [{"name": "RandomChoice", "kwargs": {"transforms": short}}]
    return specs + short


# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec (not installable here);
# they still work, and the warning would repeat in every loader worker. The filter, as
# ``warnings.filterwarnings`` writes it: checked for at each decode (a ``catch_warnings`` around
# each cost ~20 us, several percent of a small JPEG's decode), added again where something
# (pytest, a caller's ``catch_warnings``) reset the filters.
_QUIET_DECODER = ("ignore", re.compile("The image decoding", re.I), DeprecationWarning, None, 0)


@functools.cache
def _decoder(mode: str):
    """torchvision's decoder and its read mode for ``mode``."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    return (ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY), tv_decode


def decode_image(data: bytes, mode: str = "RGB") -> torch.Tensor:
    """An encoded image as a uint8 tensor (C, H, W) in ``mode`` (``RGB``: 3 channels, ``L``: 1).

    torchvision's decoder first (libjpeg/libpng, no Python objects per pixel); Pillow for what
    it cannot read.

    Raises:
        ValueError: neither can decode the bytes.
    """
    if not data:
        raise ValueError("cannot decode image: no bytes")
    read_mode, tv_decode = _decoder(mode)
    if _QUIET_DECODER not in warnings.filters:
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # one copy, writable
    try:
        out = tv_decode(buffer, mode=read_mode)
        if out.shape[0] == len(mode):  # its WebP decoder ignores GRAY: Pillow converts those
            return out
        raise RuntimeError(f"decoded {out.shape[0]} channels, not {len(mode)}")
    except RuntimeError:
        from PIL import Image, UnidentifiedImageError

        try:
            array = np.asarray(Image.open(io.BytesIO(data)).convert(mode))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot decode image: {err}") from None
        return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).copy()).permute(
            2, 0, 1
        )


class ImageTransform:
    """Per-sample callable for ``StreamingDataset(transform=...)``: a shard record
    ``{"image": bytes, "label": int}`` in, ``(image float tensor (C,H,W), label)`` out.

    Decoding and augmentation happen where it is called: in the DataLoader workers.

    Args:
        specs: the ``{name, kwargs}`` list (``data.transforms.train`` or ``.eval``).
        mode: colour mode of the stored images (the manifest's ``meta.image_mode``).
        where: the list's place in the config, for messages.
    """

    def __init__(self, specs: SpecList, mode: str = "RGB", where: str = "data.transforms") -> None:
        self.specs, self.mode, self.where = _plain(specs), mode, where
        self._pipeline: Callable | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pipeline": None}  # rebuilt in the worker

    def __call__(self, record: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
        if self._pipeline is None:
            self._pipeline = _fuse_to_float_normalize(build_pipeline(self.specs, self.where))
        # A plain tensor, not a tv_tensors.Image: alone in a sample, v2 transforms treat it as
        # the image all the same, without wrapping and unwrapping it at every step.
        out = self._pipeline(decode_image(record["image"], self.mode))
        return out.as_subclass(torch.Tensor), int(record["label"])


class _ToFloatNormalize:
    """``ToDtype(float32, scale=True)`` then ``Normalize(mean, std)`` of one uint8 image as two
    in-place tensor operations, ``(x - 255 mean) / (255 std)``: the two v2 transforms cost more
    Python per sample than the arithmetic (about a fifth of a small image's decode + augment).
    Anything else (a float image, another channel count: Normalize's own error) goes through
    the v2 transforms."""

    def __init__(self, to_dtype: Any, normalize: Any) -> None:
        self.fallback = _v2().Compose([to_dtype, normalize])
        self.shift = torch.tensor(normalize.mean, dtype=torch.float32).view(-1, 1, 1) * 255
        self.scale = 1 / (torch.tensor(normalize.std, dtype=torch.float32).view(-1, 1, 1) * 255)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != len(self.shift):
            return self.fallback(image)
        return image.to(torch.float32).sub_(self.shift).mul_(self.scale)


def _fuse_to_float_normalize(pipeline: Any) -> Callable:
    """``pipeline`` (a ``v2.Compose``) with a final ToDtype(float32, scale) + Normalize pair
    replaced by ``_ToFloatNormalize``; unchanged otherwise."""
    v2 = _v2()
    steps = list(pipeline.transforms)
    if len(steps) < 2:
        return pipeline
    to_dtype, normalize = steps[-2:]
    if not (
        type(to_dtype) is v2.ToDtype
        and to_dtype.dtype is torch.float32
        and to_dtype.scale
        and type(normalize) is v2.Normalize
    ):
        return pipeline
    head = v2.Compose(steps[:-2]) if len(steps) > 2 else None
    tail = _ToFloatNormalize(to_dtype, normalize)
    return lambda image: tail(head(image) if head is not None else image)


class BatchCollate:
    """``collate`` for ``StreamingDataset``: stacks ``(image, label)`` samples, then applies the
    batch transforms (MixUp/CutMix make the labels soft: (N, num_classes) float).

    Args:
        specs: the batch transforms (``batch_specs(cfg)``); empty: plain stacking.
        num_classes: filled into MixUp/CutMix.
    """

    def __init__(self, specs: SpecList, num_classes: int, where: str = "data.transforms.batch"):
        self.specs, self.num_classes, self.where = _plain(specs), num_classes, where
        self._transform: Callable | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_transform": None}

    def __call__(
        self, samples: list[tuple[torch.Tensor, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = default_collate(samples)
        if not self.specs:
            return images, labels
        if self._transform is None:
            defaults = {"num_classes": self.num_classes}
            steps = [build_one(s, f"{self.where}[{i}]", defaults) for i, s in enumerate(self.specs)]
            self._transform = _v2().Compose(steps)
        return self._transform(images, labels)


def image_transforms(
    cfg: DataConfig, num_classes: int, mode: str = "RGB"
) -> tuple[ImageTransform, ImageTransform, BatchCollate]:
    """The train and eval per-sample transforms and the train collate that ``cfg`` describes.

    Raises:
        ConfigError: see ``check_transforms`` (called here, so mistakes show before training).
    """
    train = ImageTransform(cfg.transforms.train, mode, "data.transforms.train")
    evaluate = ImageTransform(cfg.transforms.eval, mode, "data.transforms.eval")
    collate = BatchCollate(batch_specs(cfg), num_classes)
    check_transforms(train, evaluate, collate)
    return train, evaluate, collate


def check_transforms(
    train: ImageTransform, evaluate: ImageTransform, collate: BatchCollate, size: int = 32
) -> None:
    """Build every pipeline and run it once on a blank image, so that a wrong name or argument
    (or one that only fails on data, such as Normalize with the wrong number of channels)
    fails at start-up, in one line naming the list.

    Raises:
        ConfigError: naming the list and the first problem.
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.new(train.mode, (size, size)).save(buf, format="PNG")
    record = {"image": buf.getvalue(), "label": 0}
    samples = []
    for transform in (train, evaluate):
        try:
            samples.append(transform(record))
        except ConfigError:
            raise
        except (TypeError, ValueError, RuntimeError) as err:
            raise entry_error(transform, record, err) from None
    if samples[0][0].shape != samples[1][0].shape:
        raise ConfigError(
            f"config error: data.transforms: train images come out {tuple(samples[0][0].shape)} "
            f"but eval images {tuple(samples[1][0].shape)}; give both lists the same final size"
        )
    try:
        collate([samples[0], samples[0]])
    except ConfigError:
        raise
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"config error: {collate.where}: {_first_line(err)}") from None


def entry_error(transform: Any, record: Mapping[str, Any], err: Exception) -> ConfigError:
    """The ConfigError for a pipeline that failed on ``record`` with ``err``, naming the entry
    that fails (``data.transforms.train[1] (RandomResizedCrop)``): the list is replayed one
    entry at a time. A value that only fails when applied (a reversed ``scale`` range) was
    otherwise said in torch's words alone.

    Args:
        transform: an ``ImageTransform`` (or an object wrapping one as ``inner``).
        record: the shard record it failed on.
        err: what it raised.

    Returns:
        The error to raise.
    """
    transform = getattr(transform, "inner", transform)
    v2 = _v2()
    image = decode_image(record["image"], transform.mode)
    specs = transform.specs
    to_float = not any(spec["name"] == "ToDtype" for spec in specs)
    for i, spec in enumerate(specs):
        where = f"{transform.where}[{i}]"
        try:
            if to_float and spec["name"] == "Normalize":  # build_pipeline's ToDtype goes here
                image, to_float = v2.ToDtype(torch.float32, scale=True)(image), False
            image = build_one(spec, where)(image)
        except ConfigError as inner:
            return inner
        except (TypeError, ValueError, RuntimeError) as inner:
            return ConfigError(f"config error: {where} ({spec['name']}): {_first_line(inner)}")
    return ConfigError(f"config error: {transform.where}: {_first_line(err)}")


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
