"""Retrain only when it matters: the promoted-model registry and the model-inputs fingerprint.

The *model-inputs fingerprint* names everything that shapes a trained model: the dataset artifact's version
(a hash of its arrays and the data config, see ``kubetrain.data.dataset``) and the config
sections that drive tuning, training, quantization and evaluation. Where the work runs
(``cluster``) is not part of it. Promotion publishes the model and its fingerprint to
``retrain.registry`` (a directory or fsspec URI)::

    <registry>/promoted.json                 the last promotion: fingerprint, dataset, accuracy
    <registry>/models/<fingerprint>/fp32/    the promoted fp32 model artifact
    <registry>/models/<fingerprint>/int8/    and its int8 twin

With ``retrain.only_if_changed`` the pipeline compares the fingerprint of this run's inputs to
``promoted.json`` before tuning and skips everything after preprocess when they are equal. The
check reads only the registry, so it works the same under kfp.local (a local directory) and on a
cluster (a path on the shared claim, or an object store URI).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetrain.core.artifacts import PROMOTED_FP32, PROMOTED_INT8, REGISTRY_RECORD, Promotion
from kubetrain.core.errors import KubetrainError

if TYPE_CHECKING:
    from kubetrain.registry.config import RetrainConfig

log = logging.getLogger(__name__)

# The config sections whose change must retrain the model.
MODEL_INPUT_SECTIONS = ("data", "model", "train", "tune", "quantize", "evaluate")


def model_inputs_fingerprint(inputs_json: str, dataset_version: str) -> str:
    """16 hex digits naming what shapes a trained model: the dataset version and the config
    sections of ``MODEL_INPUT_SECTIONS`` as JSON (``PipelineConfig.model_inputs_json``: without
    the train fields that only change how a job runs). Equal fingerprints: retraining would make
    the same model."""
    h = hashlib.sha256(dataset_version.encode())
    h.update(inputs_json.encode())
    return h.hexdigest()[:16]


def _fs(registry: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(registry)
    except (ImportError, ValueError) as err:
        raise KubetrainError(f"retrain.registry {registry!r}: {err}") from None


def last_promotion(registry: str) -> dict[str, Any] | None:
    """The registry's ``promoted.json``, or None if nothing was promoted there yet."""
    fs, root = _fs(registry)
    path = f"{root.rstrip('/')}/{REGISTRY_RECORD}"
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise KubetrainError(
            f"retrain.registry: cannot read {registry}/{REGISTRY_RECORD}: {err}"
        ) from None


def needs_training(
    retrain: RetrainConfig, inputs_json: str, dataset_version: str
) -> tuple[bool, str]:
    """(train?, why) for ``retrain.only_if_changed``; always True without a registry.

    Args:
        retrain: the ``retrain`` section.
        inputs_json: the config sections that shape the model (``model_inputs_fingerprint``).
        dataset_version: the dataset artifact's version.
    """
    registry = retrain.registry
    if not retrain.only_if_changed or not registry:
        return True, "retrain.only_if_changed is off"
    current = model_inputs_fingerprint(inputs_json, dataset_version)
    last = last_promotion(registry)
    if last is None:
        return True, f"no model has been promoted to {registry} yet"
    if last.get("fingerprint") != current:
        if last.get("dataset_version") != dataset_version:
            return True, (
                f"the data changed (dataset {last.get('dataset_version')} -> {dataset_version})"
            )
        return True, "the config changed since the last promoted model"
    return False, (
        f"data and config unchanged since the model promoted at {last.get('promoted_at')} "
        f"(fingerprint {current}); nothing to train"
    )


def publish(registry: str, promoted_dir: Path, promotion: Promotion, inputs_json: str) -> Promotion:
    """Copy the promoted artifact to ``models/<key>/`` and then write ``promoted.json``.

    Args:
        registry: directory or fsspec URI (``retrain.registry``).
        promoted_dir: the promote step's artifact (``fp32/`` and ``int8/``).
        promotion: what was promoted (accuracy, dataset version).
        inputs_json: the config sections the model was made with (part of its key:
            ``model_inputs_fingerprint``).

    Returns:
        ``promotion`` with its registry key, model URI and time.

    Raises:
        KubetrainError: the registry URI cannot be used.

    The record is written last (and through a temporary name), so a reader never sees a
    promotion whose model is not complete.
    """
    from datetime import datetime, timezone

    fs, root = _fs(registry)
    root = root.rstrip("/")
    key = model_inputs_fingerprint(inputs_json, promotion.dataset_version)
    target = f"{root}/models/{key}"
    fs.makedirs(target, exist_ok=True)
    for part in (PROMOTED_FP32, PROMOTED_INT8):
        fs.put(str(promoted_dir / part), f"{target}/", recursive=True)
    full = replace(
        promotion,
        fingerprint=key,
        model_uri=f"{registry.rstrip('/')}/models/{key}",
        promoted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as tmp:
        json.dump(full.to_record(), tmp, indent=2)
    tmp_remote = f"{root}/.{REGISTRY_RECORD}.tmp"
    fs.put(tmp.name, tmp_remote)
    Path(tmp.name).unlink()
    fs.mv(tmp_remote, f"{root}/{REGISTRY_RECORD}")
    log.info("published the promoted model to %s", full.model_uri)
    return full
