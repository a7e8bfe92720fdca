"""Preprocessing over several tasks: plan -> convert x N -> merge, with the same dataset for every N.

A sharded dataset is a list of shards whose contents depend only on the input and the data
config. So the work splits where it is independent: a *plan* lists the source, draws the split
and fixes every shard before any is written (which samples, in which order: a ``ShardSlot``
each); *convert* tasks each write one contiguous range of those shards; a *merge* checks that
every range is there and writes the manifest, the statistics and the version. Nothing a convert
task writes depends on which task it is, and merge combines the per-shard parts of the
statistics in shard order (float64 sums, integer counts), so the dataset is byte for byte the
same for one task or many. One task runs the same plan, convert and merge in one process.

This module holds what every kind shares: the ranges (``assign_ranges``), the completeness check
(``ordered_results``), the shards' way from the parts into the dataset (``gather``) and the
records' conversions. A kind brings its planner, converter and merger
(``kubetrain.data.images``, ``kubetrain.data.text``; the pipeline side in ``kubetrain.tasks``).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kubetrain.core.errors import DataError
from kubetrain.core.records import (
    DatasetPart,
    PreprocessPlan,
    ShardRecord,
    ShardSlot,
    SlotResult,
)
from kubetrain.data.shards import ShardInfo

log = logging.getLogger(__name__)


def assign_ranges(samples: Sequence[int], num_tasks: int) -> list[tuple[int, int]]:
    """Cut the slots (their planned sample counts, in order) into ``num_tasks`` contiguous
    ranges of about equal samples; a task gets an empty range when there are fewer slots.

    Args:
        samples: planned samples per slot, in slot order.
        num_tasks: convert tasks (at least 1).

    Returns:
        ``[(first, end), ...]``, one per task, covering every slot once, in order.
    """
    if num_tasks < 1:
        raise ValueError("num_tasks must be at least 1")
    total = sum(samples)
    ranges: list[tuple[int, int]] = []
    first, seen = 0, 0
    for task in range(num_tasks):
        if task == num_tasks - 1:
            end = len(samples)
        else:
            goal = total * (task + 1) / num_tasks
            end = first
            # Take slots while that brings the range's end closer to its share of the samples.
            while end < len(samples) and abs(seen + samples[end] - goal) <= abs(seen - goal):
                seen += samples[end]
                end += 1
        ranges.append((first, end))
        first = end
    return ranges


def range_label(plan: PreprocessPlan, task: int) -> str:
    """How messages name convert task ``task``'s range: ``range 2/3 (train-000004..train-000007,
    8192 samples)``."""
    first, end = plan.ranges[task]
    where = f"range {task + 1}/{plan.num_tasks}"
    if first == end:
        return f"{where} (no shards)"
    slots = plan.slots[first:end]
    names = f"{slots[0].name.removesuffix('.parquet')}..{slots[-1].name.removesuffix('.parquet')}"
    return f"{where} ({names}, {sum(s.samples for s in slots)} samples)"


def task_slots(plan: PreprocessPlan, task: int) -> list[int]:
    """The slot numbers convert task ``task`` writes.

    Raises:
        DataError: ``task`` is not a task of the plan.
    """
    if not 0 <= task < plan.num_tasks:
        raise DataError(
            f"data error: convert task {task} of a plan of {plan.num_tasks} tasks (0.."
            f"{plan.num_tasks - 1})"
        )
    first, end = plan.ranges[task]
    return list(range(first, end))


def convert_part(
    planned: PreprocessPlan,
    task: int,
    processes: int,
    convert: Callable[[list[int]], list[SlotResult]],
) -> DatasetPart:
    """Run one convert task: ``convert`` writes the slots of task ``task``'s range and returns
    their results; the part records them with the time it took.

    Args:
        planned: the plan.
        task: which convert task (0-based).
        processes: the processes the task converts with (for the rates the benchmarks show).
        convert: the kind's converter of a list of slot numbers.
    """
    started = time.perf_counter()
    results = convert(task_slots(planned, task))
    return DatasetPart(
        kind=planned.kind, fingerprint=planned.fingerprint, task=task, slots=results,
        seconds=round(time.perf_counter() - started, 3), processes=processes,
    )  # fmt: skip


def ordered_results(
    plan: PreprocessPlan, parts: Iterable[DatasetPart | None]
) -> list[tuple[SlotResult, DatasetPart]]:
    """Every slot's result with the part it came from, in slot order, after checking that the
    parts are this plan's and complete.

    Args:
        plan: the plan the convert tasks ran.
        parts: the convert tasks' parts in any order; None for a task that left no complete part.

    Returns:
        ``(result, part)`` for every slot of the plan, in slot order.

    Raises:
        DataError: one line naming the first range that is missing (no part, or a part that
            lacks a slot of its range), or a part made from another plan.
    """
    by_task: dict[int, DatasetPart] = {}
    for part in parts:
        if part is None:
            continue
        if part.fingerprint != plan.fingerprint or part.kind != plan.kind:
            raise DataError(
                f"data error: preprocess merge: the part of convert task {part.task + 1} was made "
                f"from another plan (input {part.fingerprint}, the plan's {plan.fingerprint})"
            )
        by_task.setdefault(part.task, part)
    out: list[tuple[SlotResult, DatasetPart]] = []
    for task in range(plan.num_tasks):
        wanted = task_slots(plan, task)
        part = by_task.get(task)
        got = {r.slot: r for r in part.slots} if part is not None else {}
        missing = [s for s in wanted if s not in got]
        if part is None or missing:
            why = (
                f"no complete part from convert task {task + 1}"
                if part is None
                else f"its part lacks {plan.slots[missing[0]].name}"
            )
            raise DataError(
                f"data error: preprocess merge: {range_label(plan, task)} is missing ({why}); "
                "re-run the pipeline (finished ranges come from the cache)"
            )
        assert part is not None
        out.extend((got[s], part) for s in wanted)
    return out


def shard_info(record: ShardRecord) -> ShardInfo:
    return ShardInfo(record.path, record.num_samples, record.bytes, record.sha256)


def shard_record(info: ShardInfo) -> ShardRecord:
    return ShardRecord(
        path=info.path, num_samples=info.num_samples, bytes=info.bytes, sha256=info.sha256
    )


def _filesystem(root: str, storage_options: Mapping[str, Any] | None):
    import fsspec

    fs, path = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
    return fs, path.rstrip("/")


def gather(
    results: Sequence[tuple[SlotResult, str]],
    root: str,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Bring every slot's shard into ``root`` from the root its convert task wrote it to.

    A shard already at ``root`` (written there: one task, or ``data.shard_store``) stays; a local
    one is hard-linked where the file system allows (no copy), else copied.

    Args:
        results: ``(slot result, the root its shard is in)`` per slot.
        root: the dataset's root.
        storage_options: fsspec options of the roots.

    Raises:
        DataError: a shard a part names is not where it says, or has another size.
    """
    fs, dest = _filesystem(root, storage_options)
    fs.makedirs(dest, exist_ok=True)
    for result, src_root in results:
        if result.shard is None:
            continue
        sfs, src_dir = _filesystem(src_root, storage_options)
        here = src_root.rstrip("/") == root.rstrip("/")  # written in place
        src = posixpath.join(src_dir, result.shard.path)
        try:
            size = sfs.size(src)
        except FileNotFoundError:
            size = None
        if size != result.shard.bytes:
            found = (
                "missing" if size is None else f"{size} bytes, the part says {result.shard.bytes}"
            )
            raise DataError(f"data error: preprocess merge: shard {src}: {found}")
        target = posixpath.join(dest, result.shard.path)
        if here:
            continue
        if fs.exists(target):
            fs.rm(target)
        if _is_local(sfs) and _is_local(fs):
            try:
                os.link(src, target)
                continue
            except OSError:  # another device, or links not allowed: copy
                pass
        with sfs.open(src, "rb") as fin, fs.open(target, "wb") as fout:
            while chunk := fin.read(16 << 20):
                fout.write(chunk)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


PLAN_SPLITS = "splits.npz"  # a plan's split: indices into its listing, per split


def save_plan_files(
    directory: str | Path,
    listing: tuple[str, Mapping[str, Any]],
    parts: Mapping[str, Any],
    rest: tuple[str, Any],
) -> None:
    """Write a kind's plan into ``directory``: its listing (Parquet, one row a sample), the
    split (``PLAN_SPLITS``) and the rest of it as JSON.

    Args:
        listing: the listing's file name and its columns (lists or pyarrow arrays).
        parts: split name -> indices into the listing.
        rest: the JSON file's name and what it holds.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(dict(listing[1])), out / listing[0], compression="zstd")
    with open(out / PLAN_SPLITS, "wb") as f:
        arrays = {k: np.asarray(v, np.int64) for k, v in parts.items()}
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub: bool
    (out / rest[0]).write_text(json.dumps(rest[1]))


def load_plan_files(
    directory: str | Path, listing: str, rest: str, what: str
) -> tuple[dict[str, list[Any]], dict[str, Any], Any]:
    """A plan that ``save_plan_files`` wrote: the listing's columns, the split, the JSON.

    Raises:
        DataError: a file is missing or unreadable (``directory`` is not ``what``).
    """
    import numpy as np
    import pyarrow.parquet as pq

    path = Path(directory)
    try:
        table = pq.read_table(path / listing).to_pydict()
        with np.load(path / PLAN_SPLITS, allow_pickle=False) as npz:
            parts = {k: npz[k] for k in npz.files}
        return table, parts, json.loads((path / rest).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"data error: {path}: not {what} ({err})") from None


def whole_plan(kind: str, source: str, num_tasks: int) -> PreprocessPlan:
    """The plan of a kind that is built in one task (tabular data, a source that already is a
    sharded dataset): no slots; the convert tasks have nothing to do and merge builds it."""
    return PreprocessPlan(
        kind=kind,
        source=source,
        fingerprint="whole",
        num_tasks=num_tasks,
        slots=[],
        ranges=[(0, 0)] * num_tasks,
        whole=True,
    )


def slots_of(counts: Iterable[tuple[str, int, int]], last_rows: Iterable[int] | None = None):
    """``ShardSlot`` s of ``(split, index, samples)`` (and the last source row of each)."""
    rows = list(last_rows) if last_rows is not None else None
    return [
        ShardSlot(split=split, index=index, samples=n, last_row=rows[k] if rows else -1)
        for k, (split, index, n) in enumerate(counts)
    ]
