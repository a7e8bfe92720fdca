"""Atomic checkpoints and finding the newest good one.

A checkpoint is ``ckpt-<step>.pt`` written to a temporary file and renamed into place, followed
by ``ckpt-<step>.json`` (its SHA-256, the job's resume key and the step). A checkpoint without its
manifest, with a wrong digest or that fails to load is skipped with a warning, and the next older
one is tried. The resume key (``kubetrain.train.trainer.resume_key``) keeps a job from resuming
another job's checkpoint; the manifest stores it under its old name, ``fingerprint``.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import random
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kubetrain.io import atomic_write, read_json, write_json

if TYPE_CHECKING:
    from kubetrain.config import PipelineConfig

log = logging.getLogger(__name__)

_NAME = re.compile(r"ckpt-(\d+)\.pt$")
MANIFEST_KEY = "fingerprint"  # the resume key's name in a manifest (kept: older checkpoints)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: Path, step: int, state: dict[str, Any], resume_key: str, keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then its manifest; prune all but ``keep`` newest.

    Returns the checkpoint's path.

    Raises:
        KubetrainError: the write failed (e.g. "no space left on device while writing <path>");
            the checkpoints already there are kept.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt-{step:08d}.pt"
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()  # serialised once: written and hashed without reading it back
    # A failed write (a full disk: KubetrainError "no space left ... <path>") leaves the older
    # checkpoints as they were: nothing is pruned before the new one and its manifest are in.
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    try:
        write_json(
            path.with_suffix(".json"),
            {"step": step, "sha256": hashlib.sha256(data).hexdigest(), MANIFEST_KEY: resume_key},
        )
    except BaseException:
        path.unlink(missing_ok=True)  # without its manifest it would only be skipped later
        raise
    for old in sorted(directory.glob("ckpt-*.pt"))[:-keep]:
        old.with_suffix(".json").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return path


_ATOMIC = (int, float, bool, str, bytes, type(None))


def snapshot(state: Any) -> Any:
    """A copy of ``state`` whose tensors training can no longer change (for a background write)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, _ATOMIC):  # immutable: shared, not copied
        return state
    if isinstance(state, np.ndarray):
        return state.copy()
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        if all(type(v) in _ATOMIC for v in state):  # e.g. Python's RNG state: 625 ints
            return state if type(state) is tuple else list(state)
        return type(state)(snapshot(v) for v in state)
    return copy.deepcopy(state)


class AsyncWriter:
    """Writes checkpoints on a background thread: training only pays for the snapshot.

    One write at a time: a new ``submit`` (and ``wait``) first finishes the previous one and
    re-raises its error, so a failed write is never silently lost.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    def submit(
        self, directory: Path, step: int, state: dict[str, Any], resume_key: str, keep: int
    ) -> None:
        """Snapshot ``state`` and write it (``save``) in the background."""
        self.wait()
        self._pending = self._pool.submit(save, directory, step, snapshot(state), resume_key, keep)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


def load_latest(directory: Path, resume_key: str) -> dict[str, Any] | None:
    """The newest checkpoint of this job that is complete and intact, or None."""
    if not directory.is_dir():
        return None
    candidates = sorted(
        (p for p in directory.glob("ckpt-*.pt") if _NAME.search(p.name)), reverse=True
    )
    for path in candidates:
        manifest = path.with_suffix(".json")
        if not manifest.is_file():
            log.warning("skipping checkpoint %s: no manifest (partial write)", path)
            continue
        meta = read_json(manifest)
        if meta.get(MANIFEST_KEY) != resume_key:
            log.warning("skipping checkpoint %s: it belongs to another job/config", path)
            continue
        if _sha256(path) != meta.get("sha256"):
            log.warning("skipping checkpoint %s: digest mismatch (corrupt)", path)
            continue
        try:
            # Our own file with a verified digest; it holds RNG states (numpy/python objects).
            state = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as err:
            log.warning("skipping checkpoint %s: cannot load (%s)", path, err)
            continue
        log.info("resuming from %s (step %d)", path, meta["step"])
        return state
    return None


def checkpoint_dir(cfg: PipelineConfig, out_dir: Path) -> Path:
    """``train.checkpoint_dir``, else ``$KUBETRAIN_CHECKPOINT_DIR`` (set in PyTorchJob pods: a
    path on the shared volume that outlives a pod), else ``<model output>/checkpoints``."""
    if cfg.train.checkpoint_dir:
        return Path(cfg.train.checkpoint_dir)
    if os.environ.get("KUBETRAIN_CHECKPOINT_DIR"):
        return Path(os.environ["KUBETRAIN_CHECKPOINT_DIR"])
    return out_dir / "checkpoints"
