"""How every bench script prints its figures: a Markdown table under a `## title` line, ready to
paste into bench/RESULTS.md (tests/bench/test_bench_smoke.py checks that each script prints one)."""
from __future__ import annotations

from collections.abc import Sequence


def markdown_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print("\n" + markdown_table(title, header, rows), flush=True)
