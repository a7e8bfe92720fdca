"""Text sources and the text preprocess: CSV / JSONL / Parquet (local or any fsspec URI) in,
a tokenizer and token shards out.

Reading streams row by row (CSV and JSONL line by line, Parquet by record batch), so a source
larger than memory works. Each row gets its split from a seeded hash of its row number, not from a
shuffle of the whole table, for the same reason. Bad input is one ``DataError`` line naming the
file and the line (CSV, JSONL) or row (Parquet):

- a missing column names the file and the columns it has;
- bytes that are not UTF-8 name the file and line;
- empty or whitespace-only text (or target) is *skipped and counted*: real corpora have blank
  rows, and refusing the whole source for one of them helps nobody; the count is logged and
  stored in ``text.json``;
- text longer than ``data.max_length`` tokens is truncated and counted (see
  :mod:`kubetrain.data.tokenize`).

Besides files, ``data.source`` may name a corpus an installed package ships
(:mod:`kubetrain.data.corpora`; nothing is downloaded):

- ``wordnet``: WordNet glosses (``text``) and their 45 lexicographer categories (``label``);
- ``gettext:<domain>:<language>``: English messages (``text``) and their translations
  (``target``) from a gettext catalog, e.g. ``gettext:git:de``;
- ``docstrings``: the standard library's docstrings, body (``text``) -> first line (``target``).

``build_text_dataset`` writes the dataset directory: ``tokenizer.json``, the token shards with
their ``shards.json`` manifest (streamed by :class:`kubetrain.data.streaming.StreamingDataset`)
and ``text.json`` (task, classes, special token ids, counts). Every row is read (and so every bad
row found) before a byte is written. It is a plan (``plan_text``: the tokenizer, the classes, every
shard's rows), a conversion of ranges of shards (``convert_text``) and a merge (``merge_text``),
which a pipeline may run as separate tasks (``kubetrain.data.fanout``): the same shards either way. It writes into a temporary directory beside the output and
renames it at the end; into an output directory that exists and is empty (a pipeline's output
artifact, whose parent may not be ours to write), it writes in place and empties it again on a
failure: nothing half-written is left behind either way.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetrain.core.errors import ConfigError, DataError
from kubetrain.core.io import atomic_directory, empty_directory
from kubetrain.core.records import PreprocessPlan, SlotResult

log = logging.getLogger(__name__)

TEXT_META = "text.json"
TEXT_TASKS = ("text_classification", "seq2seq")
SPLITS = ("train", "val", "test")
_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


@dataclass
class TextExample:
    """One usable row: its text, its label or target (None if the task has neither), its split,
    its row number in the whole source, and where it came from (``file:line``)."""

    text: str
    other: str | None
    split: str
    row: int
    where: str


@dataclass
class ReadStats:
    """What reading a source found: rows seen, and rows skipped because text was empty."""

    rows: int = 0
    skipped_empty: int = 0
    empty_targets: int = 0  # of those, rows whose text was there but the target empty (seq2seq)
    per_split: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0, "test": 0})


def text_format(path: str) -> str:
    """The reader for ``path`` from its suffix (``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``,
    ``.parquet``, optionally compressed: ``.csv.gz``).

    Raises:
        DataError: the suffix is none of these.
    """
    name = path.lower()
    for ext in _COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    for ext, kind in _FORMATS.items():
        if name.endswith(ext):
            return kind
    raise DataError(f"{path}: unknown text source format (use .csv, .tsv, .jsonl or .parquet)")


def source_files(source: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The files of ``source``: one path or URI, or a glob pattern (sorted matches).

    Raises:
        DataError: nothing matches.
    """
    import fsspec

    fs, path = fsspec.core.url_to_fs(source, **dict(storage_options or {}))
    if any(c in path for c in "*?["):
        found = sorted(fs.glob(path))
        if not found:
            raise DataError(f"{source}: no files match")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        return [p if protocol in ("file", "local") else f"{protocol}://{p}" for p in found]
    if not fs.exists(path):
        raise DataError(f"{source}: no such file")
    return [source]


def _decode_lines(lines: Iterator[bytes], where: str) -> Iterator[str]:
    for n, raw in enumerate(lines, 1):
        try:
            # A byte-order mark on the first line is a UTF-8 encoder's habit, not text.
            yield raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{where}:{n}: bytes that are not UTF-8 ({err.reason} at byte {err.start + 1} "
                "of the line); re-encode the file as UTF-8"
            ) from None


def _missing(where: str, wanted: Sequence[str], have: Sequence[str]) -> None:
    lost = [c for c in wanted if c not in have]
    if lost:
        raise DataError(
            f"{where}: no column {lost[0]!r} (columns: {', '.join(map(str, have)) or 'none'})"
        )


def _rows_csv(f, where: str, columns: Sequence[str], delimiter: str):
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(_decode_lines(iter(f), where), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{where}: empty file (no header row)") from None
    _missing(where, columns, header)
    index = [header.index(c) for c in columns]
    for values in reader:
        if not values:
            continue
        if len(values) != len(header):
            raise DataError(
                f"{where}:{reader.line_num}: {len(values)} fields, the header has {len(header)}"
            )
        yield f"{where}:{reader.line_num}", [values[i] for i in index]


def _rows_jsonl(f, where: str, columns: Sequence[str]):
    for n, line in enumerate(_decode_lines(iter(f), where), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}:{n}: not JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}:{n}: a JSON object per line expected")
        _missing(f"{where}:{n}", columns, list(obj))
        yield f"{where}:{n}", [obj[c] for c in columns]


def _rows_parquet(f, where: str, columns: Sequence[str]):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    _missing(where, columns, pf.schema_arrow.names)
    row = 0
    for batch in pf.iter_batches(columns=list(columns), batch_size=4096):
        cols = [batch.column(c).to_pylist() for c in columns]
        for values in zip(*cols, strict=True):
            row += 1
            out = []
            for v in values:
                if isinstance(v, bytes):  # a binary column: text only if it is UTF-8
                    try:
                        v = v.decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise DataError(
                            f"{where}: row {row}: bytes that are not UTF-8 ({err.reason})"
                        ) from None
                out.append(v)
            yield f"{where}: row {row}", out


def builtin_corpus(source: str) -> Iterator[dict[str, str]] | None:
    """The records of a built-in corpus name (see the module docstring), or None when
    ``source`` names none (it is then a path or URI).

    Raises:
        DataError: a ``gettext:`` name without domain and language; the package that ships the
            corpus is not installed.
    """
    if source not in ("wordnet", "docstrings") and not source.startswith("gettext:"):
        return None
    return iter(_corpus(source))


@functools.lru_cache(maxsize=2)
def _corpus(source: str) -> tuple[dict[str, str], ...]:
    # Held once per process: the preprocess reads its source twice (tokenizer, then shards), and
    # parsing the standard library for docstrings costs more than keeping ~100k short records.
    from kubetrain.data import corpora

    if source == "wordnet":
        return tuple(corpora.wordnet_glosses())
    if source == "docstrings":
        return tuple(corpora.docstring_pairs())
    parts = source.split(":")
    if len(parts) != 3 or not all(parts[1:]):
        raise DataError(
            f"{source}: a gettext corpus is gettext:<domain>:<language>, e.g. gettext:git:de"
        )
    return tuple(corpora.gettext_pairs(parts[1], parts[2]))


def _rows_corpus(records: Iterator[dict[str, str]], source: str, columns: Sequence[str]):
    for n, record in enumerate(records, 1):
        if n == 1:
            _missing(source, columns, list(record))
        yield f"{source}: record {n}", [record.get(c) for c in columns]


def iter_rows(
    source: str, columns: Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> Iterator[tuple[str, list[Any]]]:
    """``(where, values)`` for every row of every file of ``source``, ``values`` in the order of
    ``columns``; ``where`` is ``file:line`` (CSV, JSONL) or ``file: row N`` (Parquet), or
    ``<corpus>: record N`` for a built-in corpus (:func:`builtin_corpus`).

    Raises:
        DataError: no such file, unknown format, a missing column, bytes that are not UTF-8,
            a malformed line.
    """
    import fsspec

    corpus = builtin_corpus(source)
    if corpus is not None:
        yield from _rows_corpus(corpus, source, columns)
        return
    for path in source_files(source, storage_options):
        kind = text_format(path)
        with fsspec.open(path, "rb", compression="infer", **dict(storage_options or {})) as f:
            if kind == "parquet":
                yield from _rows_parquet(f, path, columns)
            elif kind == "jsonl":
                yield from _rows_jsonl(f, path, columns)
            else:
                yield from _rows_csv(f, path, columns, "\t" if kind == "tsv" else ",")


def split_of(row: int, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split of source row ``row``: a seeded hash, so every reader of the same source agrees
    without holding it in memory (fractions hold in expectation, not exactly)."""
    # splitmix64 of (seed, row): cheap, well mixed, the same on every platform.
    z = (row * 0x9E3779B97F4A7C15 + (seed + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    u = (z ^ (z >> 31)) / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def _as_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return ""
    return value if isinstance(value, str) else str(value)


def iter_examples(cfg, stats: ReadStats | None = None) -> Iterator[TextExample]:
    """The usable examples of the text source ``cfg`` (a ``DataConfig`` with a text task), with
    their split; empty texts (and empty targets of seq2seq) are skipped and counted in ``stats``.

    Raises:
        ConfigError: ``cfg.task`` is not a text task.
        DataError: as :func:`iter_rows`; a missing label.
    """
    if cfg.task not in TEXT_TASKS:
        raise ConfigError(f"config error: data.task: {cfg.task!r} is not a text task {TEXT_TASKS}")
    other = cfg.label_column if cfg.task == "text_classification" else cfg.target_column
    stats = stats if stats is not None else ReadStats()
    for row, (where, (text, value)) in enumerate(
        iter_rows(cfg.source, [cfg.text_column, other], cfg.storage_options)
    ):
        stats.rows += 1
        text = _as_text(text)
        value = _as_text(value)
        if cfg.task == "text_classification" and not value.strip():
            raise DataError(f"{where}: empty label in column {other!r}")
        if not text.strip() or not value.strip():
            stats.skipped_empty += 1
            stats.empty_targets += bool(text.strip())
            continue
        split = split_of(row, cfg.seed, cfg.val_fraction, cfg.test_fraction)
        stats.per_split[split] += 1
        yield TextExample(text, value, split, row, where)


def _sorted_classes(names) -> list[str]:
    names = list(names)
    try:  # integer labels sort as numbers (2 before 10)
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


@dataclass
class TextMeta:
    """``text.json``: what a later step needs to read the token shards the same way."""

    task: str
    max_length: int
    special_ids: dict[str, int]
    vocab_size: int
    classes: list[str] | None
    rows: int
    skipped_empty: int
    truncated: int
    tokens: dict[str, int]
    samples: dict[str, int]
    tokenize_seconds: float
    tokenize_processes: int

    def save(self, directory: str | Path) -> None:
        Path(directory, TEXT_META).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> TextMeta:
        """Read ``text.json``; raises DataError if it is missing or not one."""
        where = Path(directory, TEXT_META)
        try:
            return cls(**json.loads(where.read_text()))
        except FileNotFoundError:
            raise DataError(f"{where}: missing (not a text dataset)") from None
        except (json.JSONDecodeError, TypeError) as err:
            raise DataError(f"{where}: unreadable ({err})") from None


def _refuse_foreign_out(out: Path) -> None:
    """Raise DataError if ``out`` holds something other than a text dataset."""
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / TEXT_META).is_file()):
        raise DataError(f"{out}: exists and is not a text dataset; refusing to replace it")


# -- plan, convert, merge (kubetrain.data.fanout) -------------------------------------------------
TEXT_PLAN = "text-plan.json"  # the plan's classes, counts and special ids (beside tokenizer.json)


def _priority(row: int, seed: int) -> int:
    """A seeded hash of a row (splitmix64): the order in which rows enter the tokenizer's
    sample, the same in every run and process."""
    z = (row * 0x9E3779B97F4A7C15 + (seed + 11) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


class _Sample:
    """The rows of lowest priority seen, at most ``size`` (a uniform sample without replacement,
    kept while reading once); all rows when there are no more than ``size``."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self._heap: list[tuple[int, int, tuple[str, ...]]] = []

    def add(self, row: int, texts: tuple[str, ...]) -> None:
        import heapq

        item = (-_priority(row, self.seed), row, texts)
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, item)
        elif item[0] > self._heap[0][0]:  # a lower priority than the highest kept
            heapq.heapreplace(self._heap, item)

    def texts(self) -> Iterator[str]:
        """The kept rows' texts, in source order."""
        for _, _, texts in sorted(self._heap, key=lambda item: item[1]):
            yield from texts

    def __len__(self) -> int:
        return len(self._heap)


@dataclass
class TextPlan:
    """What the plan fixes for text: the tokenizer, the classes, what reading found, and the
    shards (``record``: each shard's split, number, samples and last source row; each convert
    task's range of them)."""

    tokenizer: Any
    classes: list[str] | None
    stats: ReadStats
    special: dict[str, int]
    record: PreprocessPlan

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``text-plan.json`` into ``directory`` (the record is
        the caller's: ``kubetrain.core.artifacts.PlanArtifact``)."""
        from kubetrain.data import tokenize

        tokenize.save_tokenizer(self.tokenizer, directory)
        record = {"classes": self.classes, "stats": asdict(self.stats), "special": self.special}
        Path(directory, TEXT_PLAN).write_text(json.dumps(record))

    @classmethod
    def load(cls, directory: str | Path, record: PreprocessPlan) -> TextPlan:
        """The plan saved in ``directory``; raises DataError if it is not one."""
        from kubetrain.data import tokenize

        try:
            data = json.loads(Path(directory, TEXT_PLAN).read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"data error: {directory}: not a text plan ({err})") from None
        tok = tokenize.load_tokenizer(Path(directory, tokenize.TOKENIZER_FILE))
        return cls(tok, data["classes"], ReadStats(**data["stats"]), data["special"], record)


def plan_text(cfg, num_tasks: int) -> TextPlan:
    """Plan the text dataset of ``cfg`` for ``num_tasks`` convert tasks.

    Reads every row once (so every bad row is found before a byte is written): the classes,
    the counts, a seeded sample of the training split (``data.tokenizer.sample_size`` rows),
    and where each shard's examples are (``tokenize.cut_parts`` on rows and splits only). Then
    trains the tokenizer on the sample (in source order; or loads ``data.tokenizer.path``) and
    cuts the shards into contiguous ranges of about equal size.

    Raises:
        ConfigError: not a text task.
        DataError: bad source (see the module docstring), a bad tokenizer file, no training
            text.
    """
    import hashlib

    from kubetrain.data import tokenize

    stats = ReadStats()
    classes: Counter[str] = Counter()
    is_cls = cfg.task == "text_classification"
    sample = _Sample(cfg.tokenizer.sample_size, cfg.seed)
    content = hashlib.sha256()  # of every usable row: the input's identity

    def rows() -> Iterator[tuple[str, int, str, Any]]:
        for ex in iter_examples(cfg, stats):
            content.update(json.dumps([ex.row, ex.text, ex.other]).encode())
            if is_cls and ex.other is not None:
                classes[ex.other] += 1
            if ex.split == "train" and cfg.tokenizer.path is None:
                # One vocabulary for both sides of a pair (tied embeddings).
                both = not is_cls and ex.other is not None
                sample.add(ex.row, (ex.text, str(ex.other)) if both else (ex.text,))
            yield ex.split, ex.row, "", None

    layout = [
        (p.split, p.index, len(p.rows), p.rows[-1])
        for p in tokenize.cut_parts(rows(), cfg.shard_samples, tokenize.MIX_PARTS, cfg.seed)
    ]
    class_list = _sorted_classes(classes) if is_cls else None
    _check_read(cfg, stats, class_list)
    tok = _plan_tokenizer(cfg, stats, sample)
    special = tokenize.special_ids(tok, cfg.tokenizer.path or "trained tokenizer")
    record = _plan_record(cfg, layout, _text_fingerprint(cfg, tok, content.hexdigest()), num_tasks)
    return TextPlan(tok, class_list, stats, special, record)


def _plan_tokenizer(cfg, stats: ReadStats, sample: _Sample) -> Any:
    """``data.tokenizer.path`` loaded, or a tokenizer trained on the sample of training rows."""
    from kubetrain.data import tokenize

    if cfg.tokenizer.path:
        return tokenize.load_tokenizer(cfg.tokenizer.path)
    if stats.per_split["train"] > len(sample):
        log.info(
            "tokenizer trained on a seeded sample of %d of the %d training rows "
            "(data.tokenizer.sample_size)", len(sample), stats.per_split["train"],
        )  # fmt: skip
    return tokenize.train_tokenizer(sample.texts(), cfg.tokenizer)


def _plan_record(
    cfg, layout: list[tuple[str, int, int, int]], fingerprint: str, num_tasks: int
) -> PreprocessPlan:
    """The plan's record: the shards (``layout``: split, number, samples, last source row) as
    slots in split order, and each of ``num_tasks`` convert tasks' range of them."""
    from kubetrain.data.fanout import assign_ranges, slots_of

    layout.sort(key=lambda p: (SPLITS.index(p[0]), p[1]))
    slots = slots_of(((s, i, n) for s, i, n, _ in layout), (last for *_, last in layout))
    return PreprocessPlan(
        kind=cfg.task,
        source=cfg.source,
        fingerprint=fingerprint,
        num_tasks=num_tasks,
        slots=slots,
        ranges=assign_ranges([s.samples for s in slots], num_tasks),
    )


def _text_fingerprint(cfg, tok, content: str) -> str:
    """What identifies a text plan: the rows read, the tokenizer and every setting that shapes
    the shards."""
    import hashlib

    settings = cfg.model_dump(
        mode="json",
        include={"task", "text_column", "label_column", "target_column", "max_length",
                 "shard_samples", "seed", "val_fraction", "test_fraction"},
    )  # fmt: skip
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(content.encode())
    h.update(tok.to_str().encode())
    return h.hexdigest()[:16]


def convert_text(
    cfg, plan: TextPlan, slots: Sequence[int], root: str, num_processes: int | None = None
) -> list[SlotResult]:
    """Tokenize the shards of ``slots`` (slot numbers of the plan) into ``root``.

    Reads the source from its start to the last row those shards hold, cuts it into the same
    parts the plan did and tokenizes only its own (``num_processes`` processes, default
    ``cfg.num_workers``).

    Returns:
        What each slot's shard holds, in slot order.

    Raises:
        DataError: the source no longer matches the plan (a shard with other counts, an unknown
            label), or reading it fails.
    """
    from kubetrain.data import tokenize
    from kubetrain.data.fanout import shard_record

    planned = plan.record.slots
    wanted = {(planned[i].split, planned[i].index): i for i in slots}
    if not wanted:
        return []
    last = max(planned[i].last_row for i in slots)
    label_index = {c: i for i, c in enumerate(plan.classes or [])}

    def examples() -> Iterator[tuple[str, int, str, Any]]:
        for ex in iter_examples(cfg, ReadStats()):
            if ex.row > last:  # every part of ours is whole: see tokenize.cut_parts
                return
            if plan.classes is None:
                yield ex.split, ex.row, ex.text, ex.other
            elif str(ex.other) in label_index:
                yield ex.split, ex.row, ex.text, label_index[str(ex.other)]
            else:
                raise DataError(f"data error: {ex.where}: label {ex.other!r} is not in the plan "
                                "(the source changed since it was planned)")  # fmt: skip

    parts = tokenize.cut_parts(examples(), cfg.shard_samples, tokenize.MIX_PARTS, cfg.seed)
    mine = (p for p in parts if (p.split, p.index) in wanted)
    processes = num_processes if num_processes is not None else max(1, cfg.num_workers)
    results = tokenize.encode_parts(
        mine, plan.tokenizer, root, cfg.task, cfg.max_length, processes, cfg.storage_options
    )
    out = []
    for r in results:
        slot = wanted[(r.split, r.index)]
        if (r.samples, r.last_row) != (planned[slot].samples, planned[slot].last_row):
            raise DataError(
                f"data error: {cfg.source}: shard {planned[slot].name} has {r.samples} samples "
                f"up to row {r.last_row}, the plan {planned[slot].samples} up to row "
                f"{planned[slot].last_row} (the source changed since it was planned)"
            )
        shard = shard_record(r.shards[0])
        out.append(
            SlotResult(slot=slot, shard=shard, samples=r.samples, class_counts=r.class_counts,
                       columns=r.columns, tokens=r.tokens, truncated=r.truncated)
        )  # fmt: skip
    return sorted(out, key=lambda r: r.slot)


def merge_text(
    cfg,
    plan: TextPlan,
    results: Sequence[SlotResult],
    root: str,
    seconds: float,
    processes: int,
) -> TextMeta:
    """The manifest of every slot's shard at ``root``, the tokenizer and ``text.json``
    (counts summed from the parts); returns ``text.json``'s content.

    Args:
        results: every slot's result, in slot order (``kubetrain.data.fanout.ordered_results``).
        seconds: the convert tasks' time (``tokenize_seconds``).
        processes: tokenizer processes over all tasks (``tokenize_processes``).
    """
    import fsspec

    from kubetrain.data import tokenize
    from kubetrain.data.fanout import shard_info

    planned = plan.record.slots
    parts = []
    for r in results:
        shards = [shard_info(r.shard)] if r.shard is not None else []
        slot = planned[r.slot]
        parts.append(
            tokenize.PartResult(slot.split, slot.index, shards, r.class_counts, r.columns,
                                r.tokens, r.truncated, r.samples)
        )  # fmt: skip
    summary = tokenize.write_splits(parts, root, processes, cfg.storage_options)
    meta = TextMeta(
        task=cfg.task,
        max_length=cfg.max_length,
        special_ids=plan.special,
        vocab_size=plan.tokenizer.get_vocab_size(),
        classes=plan.classes,
        rows=plan.stats.rows,
        skipped_empty=plan.stats.skipped_empty,
        truncated=summary.truncated,
        tokens=summary.tokens,
        samples=summary.samples,
        tokenize_seconds=round(seconds, 3),
        tokenize_processes=summary.processes,
    )
    base = root.rstrip("/")
    with fsspec.open(f"{base}/{tokenize.TOKENIZER_FILE}", "w", **cfg.storage_options) as f:
        f.write(plan.tokenizer.to_str(pretty=True))  # as Tokenizer.save writes it
    with fsspec.open(f"{base}/{TEXT_META}", "w", **cfg.storage_options) as f:
        f.write(json.dumps(asdict(meta), indent=2))
    return meta


def _write_dataset(cfg, plan: TextPlan, tmp: Path, num_processes: int | None) -> TextMeta:
    """Tokenize every shard of ``plan`` into ``tmp`` in this process, then merge."""
    processes = num_processes if num_processes is not None else max(1, cfg.num_workers)
    start = time.perf_counter()
    results = convert_text(cfg, plan, range(len(plan.record.slots)), str(tmp), processes)
    return merge_text(cfg, plan, results, str(tmp), time.perf_counter() - start, processes)


def count_notes(source: str, meta: TextMeta) -> list[str]:
    """Lines saying how many rows were skipped for empty text and how many sequences were
    truncated (none: nothing was): what reaches the terminal and the report."""
    notes = []
    if meta.skipped_empty:
        notes.append(f"{source}: skipped {meta.skipped_empty} of {meta.rows} rows with empty text")
    if meta.truncated:
        notes.append(
            f"{source}: truncated {meta.truncated} sequences longer than "
            f"data.max_length={meta.max_length} tokens"
        )
    return notes


def _warn_counts(source: str, meta: TextMeta) -> None:
    """Log the rows skipped for empty text and the sequences truncated, if any."""
    for note in count_notes(source, meta):
        log.warning("%s", note)


def _check_read(cfg, stats: ReadStats, class_list: list[str] | None) -> None:
    """Refuse what reading found unusable: no training text (naming the empty column), one
    class (a classifier of one class scores 1.0 and learns nothing; tables and images refuse
    it too).

    Raises:
        DataError: naming the source and the column.
    """
    if stats.per_split["train"] == 0:
        if stats.rows and stats.empty_targets == stats.skipped_empty == stats.rows:
            why = f"every target in column {cfg.target_column!r} is empty"
        elif stats.rows and stats.empty_targets == 0 and stats.skipped_empty == stats.rows:
            why = f"every text in column {cfg.text_column!r} is empty"
        elif stats.rows:
            why = (f"{stats.skipped_empty} rows with an empty text ({cfg.text_column!r}) or "
                   f"target ({cfg.target_column!r}), none left for the training split")  # fmt: skip
        else:
            why = "no rows"
        raise DataError(
            f"data error: {cfg.source}: no usable training text ({stats.rows} rows read: {why})"
        )
    if class_list is not None and len(class_list) < 2:
        raise DataError(
            f"data error: {cfg.source}: needs at least 2 classes in column "
            f"{cfg.label_column!r}, found {len(class_list)} ({', '.join(map(repr, class_list))})"
        )


def build_text_dataset(cfg, out: str | Path, *, num_processes: int | None = None) -> TextMeta:
    """Preprocess a text source into ``out``: tokenizer, token shards, ``text.json``.

    Args:
        cfg: the ``data`` config section (``task`` one of the text tasks).
        out: the dataset directory to create (local); an earlier text dataset there is
            replaced, anything else is refused.
        num_processes: tokenizer processes (default ``cfg.num_workers``, at least 1).

    Returns:
        The ``text.json`` contents.

    Raises:
        ConfigError: not a text task.
        DataError: bad source (see the module docstring), a bad tokenizer file, no training
            text, ``out`` holds something other than a text dataset.
    """
    out = Path(out)
    _refuse_foreign_out(out)
    plan = plan_text(cfg, 1)
    if out.is_dir() and not any(out.iterdir()):
        # An empty output directory (a pipeline's artifact): written in place, emptied on failure.
        try:
            meta = _write_dataset(cfg, plan, out, num_processes)
        except BaseException:
            empty_directory(out)
            raise
    else:
        with atomic_directory(out) as tmp:
            meta = _write_dataset(cfg, plan, tmp, num_processes)
    _warn_counts(cfg.source, meta)
    return meta
