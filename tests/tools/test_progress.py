"""Progress bars never count past their totals, on a terminal of any width (a zero-width one included)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest

SCRIPT = """
from trainio.tools._progress import byte_bar, stage_bar
with byte_bar("read", 1000, quiet=False) as advance:
    for _ in range(5):
        advance(300, 10)  # estimates adding up to 1,500 of 1,000 bytes
with stage_bar("save", 2, quiet=False) as done:
    for stage in ("a", "b", "c"):
        done(stage)
"""


@pytest.mark.parametrize("columns", [0, 80])
def test_bars_do_not_overshoot_on_any_terminal(columns: int) -> None:
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    try:
        result = subprocess.run([sys.executable, "-c", SCRIPT], stderr=terminal, stdout=subprocess.PIPE,
                                timeout=60, check=False)
    finally:
        os.close(terminal)
    shown = b""
    while select.select([master], [], [], 0.2)[0]:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert result.returncode == 0
    text = shown.decode()
    assert "1.00k/1.00k" in text and "1.20k" not in text and "1.50k" not in text
    assert "2/2" in text and "3/2" not in text
