"""Hugging Face ``transformers`` models from a local directory, behind the interfaces of the
built-in text Transformers (``model.name: hf:<dir>``, once the steps take text).

Only what ``save_pretrained`` wrote to a directory is loaded (``local_files_only``, and the hub is
switched off for the call): nothing is downloaded at run time, and a hub id is a one-line error
saying so. A directory on object storage (``s3://...``) is copied to a temporary directory first.

The adapters take and return what the built-in models do, so training, decoding
(:func:`kubetrain.models.decoding.greedy_decode` / ``beam_search``) and metrics work on either:

- :class:`HFClassifier`: ``forward(input_ids) -> logits`` (the attention mask is ``ids != pad``);
- :class:`HFSeq2Seq`: ``forward(src, tgt_in) -> logits``, ``encode``, ``decode``, the three
  special ids and ``config.max_len``.

The model's vocabulary must be the tokenizer's: give ``data.tokenizer.path`` the same directory
when it holds a ``tokenizer.json``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubetrain.core.errors import ConfigError, DataError

PREFIX = "hf:"


@dataclass(frozen=True)
class _Sizes:
    max_len: int


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "config error: model.name: hf: models need transformers: pip install "
            "'kubetrain[text-hf]'"
        ) from None
    return transformers


def local_model_dir(name: str, storage_options: dict | None = None) -> Path:
    """The local directory of ``hf:<path or URI>``; a URI is copied to a temporary directory.

    Raises:
        ConfigError: ``name`` does not start with ``hf:``, or nothing is at the path (hub ids are
            not downloaded).
    """
    if not name.startswith(PREFIX):
        raise ConfigError(f"config error: model.name: {name!r} is not 'hf:<directory>'")
    where = name[len(PREFIX) :]
    if "://" in where and not where.startswith("file://"):
        import fsspec

        fs, path = fsspec.core.url_to_fs(where, **dict(storage_options or {}))
        if not fs.isdir(path):
            raise ConfigError(f"config error: model.name: {where}: no such directory")
        local = Path(tempfile.mkdtemp(prefix="kubetrain-hf-"))
        fs.get(path.rstrip("/") + "/", str(local), recursive=True)
        return local
    path = Path(where.removeprefix("file://"))
    if not (path / "config.json").is_file():
        what = "no config.json in that directory" if path.is_dir() else "no such directory"
        raise ConfigError(
            f"config error: model.name: {name}: {what} (a directory written by "
            "save_pretrained; hub ids are not downloaded)"
        )
    return path


def _load(auto_class: str, directory: Path, **kwargs):
    tf = _transformers()
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces beside local_files_only
    try:
        return getattr(tf, auto_class).from_pretrained(
            str(directory), local_files_only=True, **kwargs
        )
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{directory}: cannot load a {auto_class} ({first})") from None
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


class HFClassifier(nn.Module):
    """``AutoModelForSequenceClassification`` as ``forward(input_ids) -> logits``."""

    def __init__(self, model: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.model, self.pad_id = model, pad_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_id).long()
        return self.model(input_ids=input_ids, attention_mask=mask).logits


class HFSeq2Seq(nn.Module):
    """``AutoModelForSeq2SeqLM`` with the built-in seq2seq model's interface."""

    def __init__(self, model: nn.Module, pad_id: int, bos_id: int, eos_id: int, max_len: int):
        super().__init__()
        self.model: Any = model  # a transformers model: get_encoder(), generation API
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.config = _Sizes(max_len)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        padding = src == self.pad_id
        out = self.model.get_encoder()(input_ids=src, attention_mask=(~padding).long())
        return out.last_hidden_state, padding

    def decode(self, tgt_in, memory, memory_padding) -> torch.Tensor:
        return self.model(
            encoder_outputs=(memory,),
            attention_mask=(~memory_padding).long(),
            decoder_input_ids=tgt_in,
            decoder_attention_mask=(tgt_in != self.pad_id).long(),
        ).logits

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, padding = self.encode(src)
        return self.decode(tgt_in, memory, padding)


def load_hf_model(
    name: str,
    task: str,
    special_ids: dict[str, int],
    *,
    num_classes: int | None = None,
    max_len: int = 512,
    storage_options: dict | None = None,
) -> nn.Module:
    """Load ``hf:<directory>`` for ``task`` behind the built-in models' interface.

    Args:
        name: ``hf:`` and a local directory (or fsspec URI) written by ``save_pretrained``.
        task: ``text_classification`` or ``seq2seq``.
        special_ids: the tokenizer's ``pad``, ``bos`` and ``eos`` ids.
        num_classes: classes of a classifier (its head is re-made if the saved one differs).
        max_len: most positions the decoders may generate.
        storage_options: fsspec options of a URI.

    Returns:
        :class:`HFClassifier` or :class:`HFSeq2Seq`.

    Raises:
        ConfigError: not ``hf:``, nothing at the path, transformers not installed, a task
            without an HF model class.
        DataError: the directory holds no model of that kind.
    """
    directory = local_model_dir(name, storage_options)
    if task == "text_classification":
        if num_classes is None:
            raise ConfigError("config error: model.name: a classifier needs num_classes")
        model = _load(
            "AutoModelForSequenceClassification",
            directory,
            num_labels=num_classes,
            ignore_mismatched_sizes=True,
        )
        return HFClassifier(model, special_ids["pad"])
    if task == "seq2seq":
        model = _load("AutoModelForSeq2SeqLM", directory)
        return HFSeq2Seq(model, special_ids["pad"], special_ids["bos"], special_ids["eos"], max_len)
    raise ConfigError(f"config error: model.name: hf: models serve text tasks, not {task!r}")
