"""Planning a multi-rank save, simulated in one process without I/O: how its time grows with the rank count.

Every rank describes the same state: ``--arrays`` bf16 matrices of ``--rows`` x
``--width``, each sharded ``Shard(0)`` over all ranks as FSDP does (uneven where
the rows do not divide), plus one replicated bias per matrix. The table gives
the time of ``make_plan`` over every rank's description (what each rank
computes in ``save()`` when the layout changed), against the number of boxes
it places; and what a save of an unchanged layout costs instead (the plan is
reused): one rank's digest of its own description, and the plan's key over
every rank's digest.

Run:  python benchmarks/plan_bench.py [--ranks 8,64,256,1024] [--arrays 100] [--rows 4096] [--width 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, machine_lines, markdown_table  # noqa: E402

from trainio.checkpoint._format.boxes import Box  # noqa: E402
from trainio.checkpoint._format.per_rank import json_digest  # noqa: E402
from trainio.checkpoint._save import plan  # noqa: E402


def descriptions(ranks: int, arrays: int, rows: int, width: int) -> list[list[list[Any]]]:
    """Every rank's rows (as :func:`describe_leaves` makes them) for the benchmark's state."""
    share = -(-rows // ranks)
    everyone = []
    for rank in range(ranks):
        start = min(rank * share, rows)
        box = Box((start, 0), (max(0, min(share, rows - start)), width)).to_json()
        mine: list[list[Any]] = []
        for a in range(arrays):
            mine.append([f"layers.{a}.weight", "torch", "bfloat16", "uint16", [rows, width], 2, box, None, None])
            mine.append([f"layers.{a}.bias", "torch", "float32", "float32", [width], 4, None, None, None])
        everyone.append(mine)
    return everyone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="8,64,256,1024", help="rank counts, comma-separated")
    parser.add_argument("--arrays", type=int, default=100)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    table = [["ranks", "boxes", "units", "plan s", "us per box", "reused: own digest s", "reused: key s"]]
    for ranks in (int(r) for r in args.ranks.split(",")):
        described = descriptions(ranks, args.arrays, args.rows, args.width)
        start = time.perf_counter()
        made = plan.make_plan(described, 32 << 20, 256 << 10, None)
        first = time.perf_counter() - start
        start = time.perf_counter()
        json_digest([row[:8] for row in described[0]])
        own = time.perf_counter() - start
        digests = [json_digest([rank]) for rank in range(ranks)]  # stand-ins: every rank's layout digest
        start = time.perf_counter()
        json_digest([32 << 20, 256 << 10, None, digests])
        again = time.perf_counter() - start
        boxes = ranks * args.arrays
        table.append([str(ranks), f"{boxes:,}", f"{len(made.units):,}", f"{first:.3f}",
                      f"{first / boxes * 1e6:.1f}", f"{own:.4f}", f"{again:.4f}"])
        print(f"  {ranks} ranks: {first:.2f} s, again {again:.2f} s", file=sys.stderr, flush=True)
    print("\n".join(machine_lines(machine(["numpy"]), "(none: no I/O)")))
    print("\n".join(markdown_table(table, left=[])))


if __name__ == "__main__":
    main()
