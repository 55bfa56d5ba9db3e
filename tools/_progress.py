"""Progress bars on a terminal, silence elsewhere."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm


def _hidden(quiet: bool) -> bool:
    """Whether to show no bar: asked not to, or not a terminal (a zero-width one still gets tqdm's short form)."""
    return quiet or not sys.stderr.isatty()


@contextmanager
def byte_bar(description: str, total: int | None, *, quiet: bool) -> Iterator[Any]:
    """A tqdm bar in bytes with a rows counter, shown only on a terminal and when not ``quiet``; it never counts
    past ``total`` (estimates of bytes read may add up to more)."""
    bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1000,
               disable=_hidden(quiet), file=sys.stderr, dynamic_ncols=True)
    rows = done = 0

    def advance(read: int, new_rows: int = 0) -> None:
        nonlocal rows, done
        rows += new_rows
        step = read if total is None else max(0, min(read, total - done))
        done += step
        bar.update(step)
        if new_rows:
            bar.set_postfix(rows=f"{rows:,}", refresh=False)

    try:
        yield advance
    finally:
        bar.close()


@contextmanager
def stage_bar(description: str, stages: int, *, quiet: bool) -> Iterator[Any]:
    """A tqdm bar of named stages, shown only on a terminal and when not ``quiet``; call it with each stage done."""
    bar = tqdm(total=stages, desc=description, unit="stage", disable=_hidden(quiet), file=sys.stderr,
               dynamic_ncols=True)
    finished = 0

    def done(stage: str) -> None:
        nonlocal finished
        bar.set_postfix_str(stage, refresh=False)
        if finished < stages:
            finished += 1
            bar.update(1)

    try:
        yield done
    finally:
        bar.close()
