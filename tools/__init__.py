"""trainio.tools: the ``trainio`` command line.

Run ``trainio --help`` for the commands. :func:`main` is the console-script
entry point and returns the process's exit code. :func:`shard` and
:func:`shard_with_ray` are the Python twins of ``trainio shard`` (local and
``--engine ray``).
"""

from __future__ import annotations

import sys

from ._cli import main as _main
from ._ray_shard import ShardTaskFailed, shard_with_ray
from ._sharding import ShardOptions, shard

__all__ = ["ShardOptions", "ShardTaskFailed", "main", "shard", "shard_with_ray"]


def main() -> None:
    """Entry point of the ``trainio`` console script."""
    sys.exit(_main())
