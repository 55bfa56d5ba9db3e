"""What every benchmark prints: a Markdown table of its rows."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(table: Sequence[Sequence[str]], left: Sequence[int]) -> list[str]:
    """``table`` (a header row, then data rows) as aligned Markdown lines; columns in ``left`` align left."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for n, row in enumerate(table):
        cells = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines
