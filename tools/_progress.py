"""Progress bars on a terminal, silence elsewhere."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm


@contextmanager
def byte_bar(description: str, total: int | None, *, quiet: bool) -> Iterator[Any]:
    """A tqdm bar in bytes with a rows counter, shown only on a terminal and when not ``quiet``."""
    bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1000,
               disable=quiet or not sys.stderr.isatty(), file=sys.stderr, dynamic_ncols=True)
    rows = 0

    def advance(read: int, new_rows: int = 0) -> None:
        nonlocal rows
        rows += new_rows
        bar.update(read)
        if new_rows:
            bar.set_postfix(rows=f"{rows:,}", refresh=False)

    try:
        yield advance
    finally:
        bar.close()


@contextmanager
def stage_bar(description: str, stages: int, *, quiet: bool) -> Iterator[Any]:
    """A tqdm bar of named stages, shown only on a terminal and when not ``quiet``; call it with each stage done."""
    bar = tqdm(total=stages, desc=description, unit="stage", disable=quiet or not sys.stderr.isatty(),
               file=sys.stderr, dynamic_ncols=True)

    def done(stage: str) -> None:
        bar.set_postfix_str(stage, refresh=False)
        bar.update(1)

    try:
        yield done
    finally:
        bar.close()
