"""Atomic checkpoints and finding the newest good one.

A checkpoint is ``ckpt-<step>.pt`` written to a temporary file and renamed into place, followed
by ``ckpt-<step>.json`` (its SHA-256, the job's resume key and the step). A checkpoint without its
manifest, with a wrong digest or that fails to load is skipped with a warning, and the next older
one is tried. The resume key (``kubetrain.train.trainer.resume_key``) keeps a job from resuming
another job's checkpoint; the manifest stores it under its old name, ``fingerprint``.

Under ``train.strategy: fsdp`` a checkpoint is a directory ``step-<step>/`` written with
``torch.distributed.checkpoint`` (DCP): every rank writes its own shards of the model and the
optimizer state (``*.distcp`` and DCP's ``.metadata``), rank 0 adds ``trainer.pt`` (schedule,
scaler, RNG states, where training stands). It is written as ``.step-<step>.partial/``, renamed
into place once complete, and ``manifest.json`` (every file's SHA-256, the resume key, the step)
is written into it last. DCP stores each tensor by name with its global shape, so the
checkpoint loads into any number of processes (``load_latest_sharded``): 2 processes' shards
into 1, or 1 process's whole tensors split over 2. The directory must be one file system that
every rank sees (a shared volume in a cluster).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import os
import random
import re
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kubetrain.core.errors import KubetrainError
from kubetrain.core.io import atomic_write, read_json, write_error, write_json

if TYPE_CHECKING:
    from torch import nn

    from kubetrain.core.distributed import DistContext
    from kubetrain.train.config import TrainingConfig

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


def _own_manifest(path: Path, manifest: Path, resume_key: str) -> dict[str, Any] | None:
    """The manifest of checkpoint ``path`` if it is complete and this job's (``resume_key``);
    None, with a warning saying why it is skipped, otherwise."""
    if not manifest.is_file():
        log.warning("skipping checkpoint %s: no manifest (partial write)", path)
        return None
    meta = read_json(manifest)
    if meta.get(MANIFEST_KEY) != resume_key:
        log.warning("skipping checkpoint %s: it belongs to another job/config", path)
        return None
    return meta


def load_latest(directory: Path, resume_key: str) -> dict[str, Any] | None:
    """The newest checkpoint of this job that is complete and intact, or None."""
    if not directory.is_dir():
        return None
    candidates = sorted(
        (p for p in directory.glob("ckpt-*.pt") if _NAME.search(p.name)), reverse=True
    )
    if not candidates and _sharded_dirs(directory):
        log.warning("not resuming the FSDP checkpoints in %s under train.strategy=ddp", directory)
    for path in candidates:
        meta = _own_manifest(path, path.with_suffix(".json"), resume_key)
        if meta is None:
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


# -- sharded (FSDP) checkpoints: torch.distributed.checkpoint ---------------------------------

_SHARDED = re.compile(r"step-(\d+)$")
_PROGRESS = "trainer.pt"  # the state besides model and optimizer, written by rank 0
_MANIFEST = "manifest.json"
_KERNEL_OPTIONS = ("fused", "foreach")


def _sharded_dirs(directory: Path) -> list[Path]:
    """The checkpoint directories in ``directory``, newest first."""
    found = [p for p in directory.glob("step-*") if p.is_dir() and _SHARDED.search(p.name)]
    return sorted(found, reverse=True)


@contextlib.contextmanager
def _single_process_is_intended():
    # DCP warns whenever it runs without a process group, even when told to (no_dist): one
    # process is a case we mean (a 1-process FSDP job writes the same format).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _agree(error: BaseException | None, ctx: DistContext) -> None:
    """Raise on every rank if any rank failed (a collective): a rank that went on alone would
    wait for the others in its next collective until the timeout."""
    from kubetrain.core.distributed import gather_objects

    messages = [m for m in gather_objects(None if error is None else str(error), ctx) if m]
    if error is not None:
        raise error
    if messages:
        raise KubetrainError(messages[0])


def save_sharded(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict[str, Any],
    resume_key: str,
    keep: int,
    ctx: DistContext,
) -> Path:
    """Write checkpoint ``step`` with DCP from every rank; prune all but ``keep`` newest.

    A collective: every rank calls it with its shards of ``model`` and ``optimizer`` (sharded
    or not); rank 0's ``progress`` (``Trainer.progress_state``) is stored beside them.

    Returns:
        The checkpoint's directory.

    Raises:
        KubetrainError: on every rank, if writing failed on any (e.g. "no space left on device
            while writing <path>"); the checkpoints already there are kept.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = directory / f"step-{step:08d}"
    partial = directory / f".step-{step:08d}.partial"
    error: BaseException | None = None
    if ctx.is_main:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # left by a killed writer
        except OSError as err:
            error = write_error(partial, err)
    _agree(error, ctx)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        with _single_process_is_intended():
            dcp.save(
                {"model": model_state, "optimizer": optimizer_state},
                checkpoint_id=partial,
                no_dist=not ctx.distributed,
            )
    except Exception as err:  # DCP gathers every rank's failure and raises on all of them
        if ctx.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        raise write_error(partial, err) from None
    if ctx.is_main:
        try:
            _finish_sharded(partial, final, step, progress, resume_key, keep)
        except Exception as err:  # shared with the other ranks, which would wait otherwise
            shutil.rmtree(partial, ignore_errors=True)
            error = err if isinstance(err, KubetrainError) else write_error(final, err)
    _agree(error, ctx)
    return final


def _finish_sharded(
    partial: Path, final: Path, step: int, progress: dict[str, Any], resume_key: str, keep: int
) -> None:
    """Rank 0, once every rank's shards are written: add the progress, move the directory into
    place, write its manifest (last), prune the older ones."""
    torch.save(progress, partial / _PROGRESS)
    digests = {p.name: _sha256(p) for p in sorted(partial.iterdir()) if p.is_file()}
    shutil.rmtree(final, ignore_errors=True)  # an earlier try at this step, never completed
    os.replace(partial, final)
    write_json(final / _MANIFEST, {"step": step, "files": digests, MANIFEST_KEY: resume_key})
    for old in _sharded_dirs(final.parent)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in final.parent.glob(".step-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def _newest_sharded(directory: Path, resume_key: str) -> Path | None:
    """The newest checkpoint directory of this job that is complete and intact, or None."""
    if not directory.is_dir():
        return None
    candidates = _sharded_dirs(directory)
    if not candidates and any(directory.glob("ckpt-*.pt")):
        log.warning("not resuming the DDP checkpoints in %s under train.strategy=fsdp", directory)
    for path in candidates:
        meta = _own_manifest(path, path / _MANIFEST, resume_key)
        if meta is None:
            continue
        files = meta.get("files") or {}
        present = {p.name for p in path.iterdir() if p.is_file() and p.name != _MANIFEST}
        if present != set(files) or any(_sha256(path / n) != d for n, d in files.items()):
            log.warning("skipping checkpoint %s: digest mismatch (corrupt)", path)
            continue
        return path
    return None


def load_latest_sharded(
    directory: Path,
    resume_key: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: DistContext,
) -> dict[str, Any] | None:
    """Load the newest good DCP checkpoint of this job into ``model`` and ``optimizer`` (each
    rank its shards, whatever the number of processes that wrote it); a collective.

    Rank 0 chooses the checkpoint (``manifest.json``, resume key and digests, as
    ``load_latest``) and every rank loads that one.

    Returns:
        The rest of the state (``Trainer.progress_state``), or None if there is no checkpoint
        to resume (the model and optimizer are then untouched).

    Raises:
        KubetrainError: the chosen checkpoint could not be read (on every rank alike).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from kubetrain.core.distributed import gather_objects

    chosen = _newest_sharded(directory, resume_key) if ctx.is_main else None
    chosen = gather_objects(None if chosen is None else str(chosen), ctx)[0]
    if chosen is None:
        return None
    path = Path(chosen)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=path, no_dist=not ctx.distributed)
        # Our own file with verified digests; it holds RNG states (numpy/python objects).
        progress = torch.load(path / _PROGRESS, weights_only=False, map_location="cpu")
    except Exception as err:
        raise KubetrainError(f"cannot resume from checkpoint {path}: {err}") from None
    # Which kernels the optimizer runs (fused, foreach) belongs to this layout, not to the one
    # that wrote the checkpoint (DTensor parameters have no fused SGD, one process does).
    kernels = [{k: g[k] for k in _KERNEL_OPTIONS if k in g} for g in optimizer.param_groups]
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    for group, kernel in zip(optimizer.param_groups, kernels, strict=True):
        group.update(kernel)
    log.info("resuming from %s (step %d)", path, progress["global_step"])
    return progress


def checkpoint_dir(cfg: TrainingConfig, out_dir: Path) -> Path:
    """``train.checkpoint_dir``, else ``$KUBETRAIN_CHECKPOINT_DIR`` (set in PyTorchJob pods: a
    path on the shared volume that outlives a pod), else ``<model output>/checkpoints``."""
    if cfg.train.checkpoint_dir:
        return Path(cfg.train.checkpoint_dir)
    if os.environ.get("KUBETRAIN_CHECKPOINT_DIR"):
        return Path(os.environ["KUBETRAIN_CHECKPOINT_DIR"])
    return out_dir / "checkpoints"
