"""Decoding throughput: incremental decoding with a key/value cache against re-decoding the whole
prefix every step, greedy and beam search, side by side in one run.

    .venv/bin/python benchmarks/decode_bench.py [--repeats 3] [--threads 1] [--batch 64]

The model has the translation recipe's size (d_model 128, 4 heads, 2+2 layers, ff 256, a 4000-token
vocabulary), random weights. A batch of sources of 30 tokens is decoded to exactly 40 new tokens:
the model's ``eos_id`` is set outside the vocabulary, so no row ends early and every variant does
the same number of steps. The re-decoding variant is the same model behind a wrapper with only
``encode``/``decode`` (what ``greedy_decode``/``beam_search`` do for a model without the cache,
such as the Hugging Face wrapper). Both give the same tokens (asserted). Variants are
interleaved and repeated; medians with min-max.

Writes ``benchmarks/results/decode.md`` (for ``benchmarks/collect.py``) and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from common import cpu_model
from torch import nn

from kubetrain.models.decoding import beam_search, greedy_decode
from kubetrain.models.transformer import Seq2SeqTransformer, TransformerConfig

HERE = Path(__file__).resolve().parent
VOCAB, SRC_LEN, NEW_TOKENS = 4000, 30, 40


class ReDecode(nn.Module):
    """The model seen as one without a cache: only ``encode``/``decode`` and the ids."""

    def __init__(self, model: Seq2SeqTransformer) -> None:
        super().__init__()
        self.model, self.config = model, model.config
        self.pad_id, self.bos_id, self.eos_id = model.pad_id, model.bos_id, model.eos_id

    def encode(self, src):
        return self.model.encode(src)

    def decode(self, tgt_in, memory, memory_padding):
        return self.model.decode(tgt_in, memory, memory_padding)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--batch", type=int, default=64, help="sources per batch")
    ap.add_argument("--beam", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = TransformerConfig(d_model=128, heads=4, layers=2, ff=256, dropout=0.0, max_len=64)
    model = Seq2SeqTransformer(VOCAB, config, pad_id=0, bos_id=1, eos_id=2).eval()
    model.eos_id = VOCAB  # never generated: every row decodes exactly NEW_TOKENS tokens
    src = torch.randint(3, VOCAB, (args.batch, SRC_LEN))
    decoders = {
        "greedy": lambda m: greedy_decode(m, src, NEW_TOKENS),
        f"beam {args.beam}": lambda m: beam_search(m, src, args.beam, NEW_TOKENS),
    }
    variants = {"cached": model, "re-decoding": ReDecode(model)}

    runs: dict[tuple[str, str], list[float]] = {}
    outputs: dict[tuple[str, str], list[list[int]]] = {}
    for dec in decoders.values():  # warm-up
        dec(model)
    for _ in range(args.repeats):  # interleaved, so drifting load hits every variant alike
        for dname, dec in decoders.items():
            for vname, m in variants.items():
                start = time.perf_counter()
                out = dec(m)
                seconds = time.perf_counter() - start
                runs.setdefault((dname, vname), []).append(args.batch / seconds)
                outputs[dname, vname] = out
    for dname in decoders:
        assert outputs[dname, "cached"] == outputs[dname, "re-decoding"], dname
        assert all(len(seq) == NEW_TOKENS for seq in outputs[dname, "cached"])

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "## Decoding throughput (`benchmarks/decode_bench.py`)",
        "",
        f"Seq2SeqTransformer, d_model 128, 4 heads, 2+2 layers, ff 256, vocabulary {VOCAB}, "
        f"random weights; {args.batch} sources of {SRC_LEN} tokens per batch, {NEW_TOKENS} new "
        "tokens each (no early `</s>`); the same tokens from both variants (asserted here; "
        "tested on varied outputs in `tests/unit/test_transformer.py`). "
        f"CPU: {cpu_model()}, {args.threads} torch thread(s); torch {torch.__version__}, "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{args.repeats} repeats, interleaved; load average at the end {load:.1f}.",
        "",
        "| decoding | cached sentences/s | re-decoding sentences/s | cached / re-decoding |",
        "|---|---|---|---|",
    ]
    for dname in decoders:
        c, r = runs[dname, "cached"], runs[dname, "re-decoding"]
        ratios = [a / b for a, b in zip(c, r, strict=True)]
        lines.append(
            f"| {dname} | {statistics.median(c):.1f} ({min(c):.1f}-{max(c):.1f}) "
            f"| {statistics.median(r):.1f} ({min(r):.1f}-{max(r):.1f}) "
            f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )
    report = "\n".join(lines) + "\n"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "decode.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
