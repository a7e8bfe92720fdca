"""Tokenization throughput: N worker processes against one, on real text.

    .venv/bin/python benchmarks/tokenize_bench.py [--processes 2] [--repeats 3] [--limit N]

The corpus is WordNet's glosses (Debian ``wordnet-base``; the standard library's docstrings where
it is absent). A BPE tokenizer (8k) is trained once on it; then the same examples are tokenized
into token shards (``kubetrain.data.tokenize.tokenize_to_shards``, shards written included) by
1 process and by N processes, interleaved and repeated; medians with min-max. The N-process
figure includes starting the worker pool (from a ``forkserver``). A third column is one process with
``tokenizers``' own thread pool (its ``encode_batch`` parallelism), for reference.

Writes ``benchmarks/results/tokenize.md`` (for ``benchmarks/collect.py``) and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent


def cpu_model() -> str:
    """The CPU's model name, from the first CPU in /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def corpus(limit: int | None) -> tuple[str, list[str]]:
    from kubetrain.core.errors import DataError
    from kubetrain.data.corpora import docstring_pairs, wordnet_glosses

    try:
        return "WordNet glosses", [r["text"] for r in islice(wordnet_glosses(), limit)]
    except DataError:
        return "stdlib docstrings", [r["text"] for r in islice(docstring_pairs(), limit)]


def run_once(examples, tok, processes: int, threads: bool) -> tuple[float, int]:
    from kubetrain.data.tokenize import tokenize_to_shards

    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = tokenize_to_shards(
            iter(examples), tok, out, task="text_classification", max_length=128,
            num_processes=processes, shard_samples=4096,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return seconds, sum(summary.tokens.values())


def padding_shares(examples, tok, batch: int = 64, window: int = 2048) -> dict[str, float]:
    """Padding share of the training batches: in stream order vs length-bucketed."""
    from kubetrain.data.batching import BucketingCollate, PaddingMeter, iter_batches
    from kubetrain.data.streaming import StreamingDataset
    from kubetrain.data.tokenize import special_ids, tokenize_to_shards

    pad = special_ids(tok, "tokenizer")["pad"]
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as root:
        tokenize_to_shards(iter(examples), tok, root, task="text_classification", max_length=128)
        for label, collate in (
            (f"batches of {batch}, stream order", BucketingCollate(pad, batch, bucket=False)),
            (f"batches of {batch}, bucketed", BucketingCollate(pad, batch)),
            (f"{batch * 16} tokens per batch, bucketed", BucketingCollate(pad, None, batch * 16)),
        ):
            meter = PaddingMeter(pad)
            for b in iter_batches(StreamingDataset(root, "train", window, collate=collate)):
                meter.add(b)
            out[label] = meter.share
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N texts")
    args = ap.parse_args(argv)

    from kubetrain.data.config import TokenizerConfig
    from kubetrain.data.tokenize import train_tokenizer

    name, texts = corpus(args.limit)
    start = time.perf_counter()
    tok = train_tokenizer(iter(texts), TokenizerConfig(kind="bpe", vocab_size=8000))
    train_s = time.perf_counter() - start
    examples = [("train", i, t, 0) for i, t in enumerate(texts)]

    runs: dict[str, list[float]] = {"1 process": [], f"{args.processes} processes": [],
                                    "1 process + tokenizers threads": []}  # fmt: skip
    run_once(examples[:2000], tok, 1, False)  # warm-up: this process's imports (pyarrow, pandas)
    tokens = 0
    for _ in range(args.repeats):  # interleaved, so drifting load hits every variant alike
        for label, procs, threads in (
            ("1 process", 1, False),
            (f"{args.processes} processes", args.processes, False),
            ("1 process + tokenizers threads", 1, True),
        ):
            seconds, tokens = run_once(examples, tok, procs, threads)
            runs[label].append(tokens / seconds)

    base = statistics.median(runs["1 process"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "## Tokenization throughput (`benchmarks/tokenize_bench.py`)",
        "",
        f"{name}: {len(texts)} texts, {tokens} tokens (BPE 8k, trained in {train_s:.1f} s; "
        f"tokenized into Parquet token shards, writing included). CPU: {cpu_model()}, "
        f"{os.cpu_count()} cores; Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.repeats} repeats, "
        f"interleaved; load average at the end {load:.1f} (processes only scale onto idle "
        "cores: read the ratio against it).",
        "",
        "| variant | tokens/s (median) | min-max | vs 1 process |",
        "|---|---|---|---|",
    ]
    for label, values in runs.items():
        med = statistics.median(values)
        lines.append(
            f"| {label} | {med:,.0f} | {min(values):,.0f}-{max(values):,.0f} | {med / base:.2f}x |"
        )
    lines += [
        "",
        "Padding share of the training batches (windows of 2048 samples from the stream, "
        "`kubetrain.data.batching`):",
        "",
        "| batching | padding share |",
        "|---|---|",
    ]
    for label, share in padding_shares(examples, tok).items():
        lines.append(f"| {label} | {share:.3f} |")
    report = "\n".join(lines) + "\n"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "tokenize.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
