"""What every benchmark prints: where it ran, and a Markdown table of its rows."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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


def machine_lines(machine: dict[str, Any], data_dir: str) -> list[str]:
    """The lines that say where a benchmark ran: machine, library versions, date and data directory."""
    return [f"machine: {machine['cpu']}, {machine['memory_gb']} GB, {machine['os']}, python {machine['python']}",
            "versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
            f"date: {machine['date']}; data in {data_dir}"]


def machine(versions_of: Sequence[str]) -> dict[str, Any]:
    """This machine: date, CPU, memory, OS, Python, and the installed versions of ``versions_of``."""
    meminfo = Path("/proc/meminfo").read_text().split()
    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    installed = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()}
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": f"{os.cpu_count()} x {model.group(1) if model else platform.processor()}",
        "memory_gb": round(int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024 / 1e9, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_version()} ({sys.prefix})",
        "versions": {name: installed.get(name, "not installed") for name in versions_of},
    }
