"""trainio.tools: the ``trainio`` command line.

Run ``trainio --help`` for the commands. :func:`main` is the console-script
entry point and returns the process's exit code.
"""

from __future__ import annotations

import sys

from ._cli import main as _main

__all__ = ["main"]


def main() -> None:
    """Entry point of the ``trainio`` console script."""
    sys.exit(_main())
