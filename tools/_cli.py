"""The ``trainio`` command line: argument parsing and the exit-code contract."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from trainio.storage import TrainioError

_DESCRIPTION = """\
trainio: the storage layer for large-model training.

Shards datasets, streams them into training, and saves and restores
checkpoints through local, parallel-file-system and S3 tiers, with every
byte hashed and verified.
"""


def _version() -> str:
    try:
        return version("trainio")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``trainio`` command with all its subcommands."""
    parser = argparse.ArgumentParser(
        prog="trainio",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trainio {_version()}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trainio`` command; return its exit code (0 on success).

    A failure prints one line, ``trainio: error: <what, where, what to do>``,
    to stderr and returns non-zero; it never shows a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args))
    except TrainioError as exc:
        print(f"trainio: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("trainio: interrupted", file=sys.stderr)
        return 130
