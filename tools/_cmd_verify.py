"""``trainio verify``: re-hash and re-decode every shard of a dataset."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from trainio.loaders import Dataset, verify_dataset
from trainio.storage import TrainioError, open_store

from ._format import human_bytes, print_json
from ._progress import byte_bar

EXAMPLES = """\
examples:
  trainio verify /nvme/datasets/c4
  trainio verify s3://corpus/trainio/v1 --json --workers 8
"""


def register(commands: Any) -> None:
    """Add the ``verify`` subcommand."""
    parser = commands.add_parser(
        "verify", help="check every shard of a dataset against its index", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Re-hash every shard (xxh3-128), check sizes, row counts against the index and the "
                    "Arrow footers, and decode every record batch. Exit code 0 only if all of it verifies.")
    parser.add_argument("url", metavar="URL", help="the dataset (path or s3:// URL)")
    parser.add_argument("--workers", type=int, default=4, metavar="N", help="shards checked in parallel (4)")
    parser.add_argument("--json", action="store_true", help="print one JSON document and no progress")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Verify; print the result; 0 only when everything verifies."""
    store = open_store(args.url)
    try:
        total: int | None = sum(s.bytes for s in Dataset(store).shards)
    except TrainioError:
        total = None  # the report will say what is wrong with the index
    with byte_bar("verify", total, quiet=args.json) as advance:
        report = verify_dataset(store, workers=args.workers, progress=advance)
    if args.json:
        print_json({"url": report.url, "ok": report.ok, "rows": report.rows, "shards": report.shards,
                    "bytes": report.bytes, "problems": [{"path": p.path, "reason": p.reason} for p in report.problems],
                    "orphans": list(report.orphans)})
    else:
        for problem in report.problems:
            print(f"trainio: error: {report.url}: {problem.path}: {problem.reason}", file=sys.stderr)
        if report.orphans and report.ok:
            print(f"note: {len(report.orphans)} files under shards/ are not in the index "
                  "(left by an unfinished write; the next write there removes them)", file=sys.stderr)
        if report.ok:
            print(f"ok: {report.url}: {report.rows:,} rows in {report.shards} shards "
                  f"({human_bytes(report.bytes)}) verified")
    return 0 if report.ok else 1
