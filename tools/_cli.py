"""The ``trainio`` command line: argument parsing and the exit-code contract."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

import pyarrow as pa

from trainio.storage import TrainioError

from . import _cmd_bench, _cmd_ckpt, _cmd_inspect, _cmd_shard, _cmd_verify

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


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other trainio error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``trainio`` command with all its subcommands."""
    parser = _OneLineParser(
        prog="trainio",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trainio {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (_cmd_shard, _cmd_verify, _cmd_inspect, _cmd_ckpt, _cmd_bench):
        command.register(commands)
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
    except (TrainioError, OSError, ValueError, pa.ArrowException) as exc:
        print(f"trainio: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("trainio: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, TrainioError) and exc.filename:
        text = f"{exc.filename}: {exc.strerror or text}"
    return " ".join(text.split())
