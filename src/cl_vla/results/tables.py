"""Markdown tables, the one writer behind the sweep report, the memory plan and the benchmarks."""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any


def md_cell(text: Any) -> str:
    """``text`` safe inside one Markdown table cell (pipes escaped, one line)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(head: Sequence[Any], rows: Sequence[Sequence[Any]], right: Container[int] = ()) -> str:
    """A GitHub Markdown table; columns whose index is in ``right`` are right-aligned (numbers)."""
    rule = ["---:" if i in right else "---" for i in range(len(head))]
    lines = ["| " + " | ".join(md_cell(h) for h in head) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
