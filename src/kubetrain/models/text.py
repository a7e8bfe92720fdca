"""Text models from the ``model`` section and a text dataset's spec: the built-in Transformers,
Hugging Face models from a directory, and a user's own factory.

The *text spec* (:func:`text_spec`) is what a model needs to know about a text dataset: task,
vocabulary size, special token ids, ``max_length``, classes. It is stored in the model artifact's
spec, so quantize, evaluate and a serving pod rebuild the same network without the dataset.

``model.name``:

- ``transformer`` / ``seq2seq_transformer``: :mod:`kubetrain.models.transformer`, sized by
  ``model.d_model``, ``heads``, ``layers``, ``decoder_layers``, ``ff``, ``dropout`` and
  ``max_len`` (default: the data's ``max_length``);
- ``hf:<directory or URI>``: :mod:`kubetrain.models.hf` (local files only);
- ``package.module:factory``: ``factory(spec: InputSpec, num_classes, **model.kwargs)`` with
  ``spec.kind`` the task, ``spec.shape == (max_length,)`` and ``spec.extra`` the text spec
  (``vocab_size``, ``special_ids``, ``max_length``, ``classes``); ``num_classes`` is None for
  seq2seq. The module it returns must take what the built-in model of the task takes (see
  :func:`check_interface`).

A classifier takes ``input_ids [B,T]``; a seq2seq model ``(src [B,S], tgt_in [B,T])`` and is
decoded through ``encode``/``decode`` (:mod:`kubetrain.models.transformer`).
"""

from __future__ import annotations

from torch import nn

from kubetrain.core.errors import ConfigError
from kubetrain.core.records import TextDatasetMeta, TextSpec
from kubetrain.models.config import FAMILIES, FEATURES, TEXT_BUILTIN, ModelConfig, family_of


def text_spec(meta: TextDatasetMeta) -> TextSpec:
    """The text spec of a text dataset's ``meta.json``."""
    return TextSpec(
        task=meta.kind,
        vocab_size=meta.vocab_size,
        special_ids=dict(meta.special_ids),
        max_length=meta.max_length,
        classes=meta.classes,
    )


def transformer_config(cfg: ModelConfig, max_length: int):
    """The :class:`TransformerConfig` of ``cfg`` for data of ``max_length`` tokens.

    Raises:
        ConfigError: ``model.max_len`` is below ``max_length``.
    """
    from kubetrain.models.transformer import TransformerConfig

    max_len = cfg.max_len or max_length
    if max_len < max_length:
        raise ConfigError(
            f"config error: model.max_len {max_len} is below data.max_length {max_length}: "
            "raise model.max_len or lower data.max_length"
        )
    return TransformerConfig(
        d_model=cfg.d_model, heads=cfg.heads, layers=cfg.layers,
        decoder_layers=cfg.decoder_layers, ff=cfg.ff, dropout=cfg.dropout, max_len=max_len,
    )  # fmt: skip


# What to use instead, per task, when a model does not take it.
_INSTEAD = {
    "text_classification": "'transformer', 'hf:<directory>' or 'package.module:factory'",
    "seq2seq": "'seq2seq_transformer', 'hf:<directory>' or 'package.module:factory'",
    "detection": "torchvision:<detection builder> (e.g. torchvision:fasterrcnn_mobilenet_v3_large_"
    "320_fpn), kubetrain.models.detection:small_fasterrcnn or package.module:factory",
}


def check_model_for_task(cfg) -> None:
    """Refuse, before any step runs, a model that cannot take the data of ``cfg.data.task``
    (the families of ``kubetrain.models.config.FAMILIES`` and the tasks each takes), and a
    text model's ``max_len`` below the data's.

    Raises:
        ConfigError: naming ``model.name`` (or ``model.max_len``) and what to use instead.
    """
    task, name = cfg.data.task, cfg.model.name
    family = FAMILIES[family_of(name)]
    task_kinds = {"classification": FEATURES}.get(task, (task,))
    if not set(task_kinds) & set(family.kinds):
        if task == "detection":
            raise ConfigError(
                f"config error: model.name: {name!r} is not a detector; data.task 'detection' "
                f"needs {_INSTEAD[task]}"
            )
        if task in _INSTEAD:
            raise ConfigError(
                f"config error: model.name: {name!r} does not take data.task {task!r}: use "
                f"{_INSTEAD[task]}"
            )
        text_task = family.kinds[0]
        raise ConfigError(
            f"config error: model.name: {name!r} is {family.what}; data.task {task!r} needs "
            f"another (set data.task to {text_task!r} for text)"
        )
    max_len = cfg.model.max_len
    text = task in ("text_classification", "seq2seq")
    if text and max_len is not None and max_len < cfg.data.max_length:
        raise ConfigError(
            f"config error: model.max_len {max_len} is below data.max_length "
            f"{cfg.data.max_length}: raise model.max_len or lower data.max_length"
        )


def check_interface(model: nn.Module, task: str, where: str) -> None:
    """Refuse a seq2seq model without what decoding needs.

    Raises:
        ConfigError: naming ``where`` and the missing attribute.
    """
    if task != "seq2seq":
        return
    for attr in ("encode", "decode", "pad_id", "bos_id", "eos_id", "config"):
        if not hasattr(model, attr):
            raise ConfigError(
                f"config error: model.name: {where}: a seq2seq model needs {attr!r} (forward(src, "
                "tgt_in), encode(src), decode(tgt_in, memory, memory_padding), pad_id, bos_id, "
                "eos_id, config.max_len; see kubetrain.models.transformer.Seq2SeqTransformer)"
            )


def _factory(cfg: ModelConfig, spec: TextSpec) -> nn.Module:
    from kubetrain.models.vision import InputSpec, call_factory

    classes = spec.classes
    inputs = InputSpec((spec.max_length,), kind=spec.task, extra=spec.to_json())
    model = call_factory(cfg.name, inputs, len(classes) if classes else None, **cfg.kwargs)
    check_interface(model, spec.task, cfg.name)
    return model


def build_text_network(cfg: ModelConfig, spec: TextSpec) -> nn.Module:
    """The network ``cfg.name`` for a text dataset of text spec ``spec`` (untrained, or as
    loaded for ``hf:``).

    Raises:
        ConfigError: a model that does not fit the task (e.g. ``mlp`` on text, ``transformer``
            on seq2seq), ``max_len`` below the data's, a factory that fails.
        DataError: an ``hf:`` directory holding no model of that kind.
    """
    from kubetrain.models import transformer

    task, family = spec.task, family_of(cfg.name)
    if family in TEXT_BUILTIN:
        model = transformer.build_text_model(
            cfg.name, spec, transformer_config(cfg, spec.max_length)
        )
    elif family == "hf":
        from kubetrain.models.hf import load_hf_model

        classes = spec.classes
        model = load_hf_model(
            cfg.name, task, spec.special_ids, num_classes=len(classes) if classes else None,
            max_len=cfg.max_len or spec.max_length,
        )  # fmt: skip
    elif family == "factory":
        model = _factory(cfg, spec)
    else:
        wanted = "transformer" if task == "text_classification" else "seq2seq_transformer"
        raise ConfigError(
            f"config error: model.name: {cfg.name!r} does not take text; data.task {task!r} "
            f"needs {wanted!r}, 'hf:<directory>' or 'package.module:factory'"
        )
    return model
