"""Assemble benchmarks/RESULTS.md from the sections the benchmark scripts wrote to results/."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

HEADER = """# Benchmark results

Written by `make bench` (each script also runs alone; its command is in its section). Every
comparison is measured side by side in one run, interleaved and repeated; figures are medians
with min–max. The machine is a shared 2-core x86 CPU without a GPU unless a section says
otherwise, so absolute numbers move from run to run; the ratios are what to read. Which CPU
differs between sessions (AVX2-only, or AVX-512 with bf16, which changes the bf16 and int8
figures): the training section names it; the search and quantization reports were measured on
the AVX2-only machine (2026-11-27/28).
"""


def main() -> None:
    sections = [p.read_text().strip() for p in sorted((HERE / "results").glob("*.md"))]
    for p in sorted((HERE / "results").glob("*.txt")):  # plain-text reports, shown as they are
        sections.append(
            f"## {p.stem} (`benchmarks/{p.stem}.py`)\n\n```\n{p.read_text().strip()}\n```"
        )
    (HERE / "RESULTS.md").write_text(HEADER + "\n" + "\n\n".join(sections) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'} ({len(sections)} section(s))")


if __name__ == "__main__":
    main()
