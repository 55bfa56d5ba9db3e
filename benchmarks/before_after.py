"""Before and after a change: one benchmark run against two commits of trainio, interleaved, on this machine.

This VM's speed drifts by tens of percent over minutes, so figures recorded
on another day say nothing about a change. This script checks out ``--before``
(a commit) into a git worktree, and then runs the same benchmark command
alternately with that tree's trainio and with this checkout's, ``--rounds``
times each, in fresh processes (each tree runs its own copy of the benchmark
script, so a benchmark that changed with the code still runs). Every line of
a Markdown table whose contender matches ``--rows`` is collected from every
round; the summary gives, per row, the median of each side's rounds of the
chosen column and their ratio (after / before).

Each tree writes its own data directory (``{data}`` in the command becomes
``DIR/before`` or ``DIR/after``, the dataset format may differ between
commits), from the same seed, and reuses it in later rounds. Where the newer
code reads the older format, give both the same directory instead: files
written at different times can sit in the page cache differently (4 KB pages
or 2 MB folios), which moves copy speeds by more than most code changes.

Run:  python benchmarks/before_after.py --before ce39b73 --rounds 3 --rows "trainio Loader" --column "GB/s" \\
          -- benchmarks/loader_bench.py --only "trainio Loader (batch 64, cpu)" --repeat 5 --min-seconds 0 \\
             --no-peer-dataloader --keep --reuse --dir {data}
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("storage", "loaders", "checkpoint", "tools")


def worktree(commit: str, where: Path) -> Path:
    """``commit`` checked out at ``where/tree``, importable as ``trainio`` from ``where/path`` (the C copy routine
    built here is linked in: trainio falls back to torch or numpy without it, which would skew the comparison)."""
    tree = where / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), commit], check=True)
    package = where / "path" / "trainio"
    package.mkdir(parents=True)
    for name in PACKAGES:
        (package / name).symlink_to(tree / name)
    built = next((REPO / "loaders").rglob("_copy.*.so"), None)
    if built is not None:
        source = next((tree / "loaders").rglob("_copy.c"), None)
        if source is not None:
            (source.parent / built.name).symlink_to(built)
    return where / "path"


def run(side: str, tree: Path, path: Path | None, command: list[str], data: Path) -> str:
    """One round of the benchmark on one side; its standard output."""
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), str(tree), env.get("PYTHONPATH", "")])
    argv = [sys.executable, str(tree / command[0]), *(a.replace("{data}", str(data / side)) for a in command[1:])]
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{side}: {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def table_rows(output: str, rows: str, column: str) -> dict[str, float]:
    """The ``column`` value of each Markdown table row whose cells mention ``rows``, keyed by its leading cells."""
    found: dict[str, float] = {}
    header: list[str] | None = None
    for line in output.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if column not in header or set(line) <= set("|-: "):
            continue
        value = cells[header.index(column)].replace(",", "")
        label = " | ".join(c for c in cells[:header.index(column)] if not _is_number(c))  # names, not figures
        if rows.lower() in label.lower():
            try:
                found[label] = float(value)
            except ValueError:
                pass
    return found


def _is_number(cell: str) -> bool:
    try:
        float(cell.replace(",", ""))
    except ValueError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="the commit to compare with (e.g. the one before the change)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating (default 3)")
    parser.add_argument("--rows", required=True, help="collect table rows whose leading cells contain this")
    parser.add_argument("--column", required=True, help="the table column to compare, e.g. 'GB/s'")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "trainio-before-after",
                        help="where each side writes its data ({data} in the command)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark script and its options")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark command after --")
    with tempfile.TemporaryDirectory() as scratch:
        path = worktree(args.before, Path(scratch))
        sides = {"before": (Path(scratch) / "tree", path), "after": (REPO, None)}
        values: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
        try:
            for round_ in range(args.rounds):
                for side in ("before", "after") if round_ % 2 == 0 else ("after", "before"):
                    tree, extra = sides[side]
                    for label, value in table_rows(run(side, tree, extra, command, args.data), args.rows,
                                                   args.column).items():
                        values[side].setdefault(label, []).append(value)
                    print(f"round {round_ + 1} {side}: done", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(Path(scratch) / "tree")],
                           check=False)
    print(f"before: {args.before}; after: this checkout; {args.rounds} rounds each, alternating; "
          f"medians of the rounds' {args.column!r}\n")
    print("| row | before | after | after / before | rounds before | rounds after |")
    print("|---|---|---|---|---|---|")
    for label in sorted(set(values["before"]) | set(values["after"])):
        before, after = values["before"].get(label, []), values["after"].get(label, [])
        b = statistics.median(before) if before else float("nan")
        a = statistics.median(after) if after else float("nan")
        print(f"| {label} | {b:.3f} | {a:.3f} | {a / b if b else float('nan'):.3f} | "
              f"{', '.join(f'{v:g}' for v in before)} | {', '.join(f'{v:g}' for v in after)} |")


if __name__ == "__main__":
    main()
