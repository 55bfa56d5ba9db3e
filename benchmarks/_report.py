"""The harness every benchmark shares: its contenders, their timing, and what it prints.

Timing: ``settle`` before a timed run, ``clocked``/``timed`` for one run,
``best`` for the shortest of several, ``in_turn`` for the order of a round.
Contenders: ``Contender``, the fields every benchmark's contender has (each
adds its own in a subclass). Printing: ``machine``/``machine_lines`` for where
it ran, ``markdown_table``, ``report_text`` for the table and its notes,
``yes_no`` for a target's column and ``reason`` for a skipped row's note.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def settle(sync: bool = False) -> None:
    """What precedes a timed run: a garbage collection and, if ``sync``, ``os.sync()`` (so no dirty pages of an
    earlier run are written back during this one)."""
    gc.collect()
    if sync:
        os.sync()


def clocked(fn: Callable[[], T], *, sync: bool = False) -> tuple[float, T]:
    """``settle(sync)``, then the seconds ``fn()`` takes and what it returned."""
    settle(sync)
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed(fn: Callable[[], Any]) -> float:
    """The seconds ``fn()`` takes, after a garbage collection."""
    return clocked(fn)[0]


def best(fn: Callable[[], Any], repeat: int, before: Callable[[], Any] = lambda: None,
         timer: Callable[[Callable[[], Any]], float] = timed) -> float:
    """The shortest of ``repeat`` runs of ``fn`` as ``timer`` times them, ``before`` run untimed ahead of each."""
    times = []
    for _ in range(repeat):
        before()
        times.append(timer(fn))
    return min(times)


def in_turn(items: Sequence[T], round_: int) -> Sequence[T]:
    """``items`` in the order of round ``round_``: as given on even rounds, reversed on odd ones (so none is always
    first)."""
    return items if round_ % 2 == 0 else items[::-1]


@dataclass(kw_only=True)
class Contender:
    """What every benchmark's contender has: a note for its row, why it was skipped ('' if it ran), and the seconds
    of its timed runs. Each benchmark subclasses it with what it runs and how it is checked."""

    note: str = ""
    skip: str = ""
    seconds: list[float] = field(default_factory=list)

    def give_up(self, exc: BaseException, why: str = "failed", width: int = 160) -> None:
        """Mark the contender skipped because of ``exc`` and drop its times."""
        self.skip = reason(exc, why, width)
        self.seconds.clear()


def reason(exc: BaseException, why: str = "skipped", width: int = 120) -> str:
    """A skipped row's note: ``why``, the exception's type and the start of its message."""
    return f"{why}: {type(exc).__name__}: {str(exc)[:width]}"


def yes_no(met: bool | None) -> str:
    """A target's column: '-' without a target, else yes or NO."""
    return "-" if met is None else ("yes" if met else "NO")


def report_text(lines: list[str], notes: Sequence[str]) -> str:
    """A benchmark's report: ``lines`` (the header and the table), a blank line, and the notes as a list."""
    return "\n".join(lines + [""] + [f"- {note}" for note in notes])


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
