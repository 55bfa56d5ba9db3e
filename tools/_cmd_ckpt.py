"""``trainio ckpt``: list, verify, promote, clean up and show checkpoint steps on a tier."""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Any

from trainio.checkpoint import (
    ArraySpec,
    collect_garbage,
    list_steps,
    promote_step,
    read_manifest,
    verify_checkpoint,
    walk_tree,
)

from ._format import human_bytes, print_json
from ._progress import byte_bar

EXAMPLES = """\
examples:
  trainio ckpt ls /nvme/ckpt /lustre/ckpt s3://bucket/run
  trainio ckpt verify /lustre/ckpt --step 12000 --workers 8
  trainio ckpt promote /nvme/ckpt s3://bucket/run --step 12000
  trainio ckpt gc /nvme/ckpt --keep-last 2
  trainio ckpt show s3://bucket/run --step 12000
"""


def register(commands: Any) -> None:
    """Add the ``ckpt`` subcommand and its own subcommands."""
    parser = commands.add_parser(
        "ckpt", help="list, verify, promote, clean up and show checkpoints", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Work on the checkpoint steps of a tier (a local directory or s3:// URL).")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = actions.add_parser(
        "ls", help="the committed steps of one or more tiers",
        description="List the committed steps of each tier: step, save time, size, files, whether the step was "
                    "verified, and the metrics saved with it. Exits 1 if a step is damaged, or if no tier holds a "
                    "committed step.")
    ls.add_argument("urls", nargs="+", metavar="URL", help="tiers (directories or s3:// URLs), fastest first")
    ls.set_defaults(run=_ls)

    verify = actions.add_parser(
        "verify", help="re-hash every file of the steps; exit 1 on any damage",
        description="Check every file of the tier's committed steps (or of --step) against its manifest: size and "
                    "xxh3-128. Reads only; exits 1 naming each damaged file.")
    verify.add_argument("url", metavar="URL", help="the tier (a directory or s3:// URL)")
    verify.add_argument("--step", type=int, action="append", metavar="N", help="check only this step (repeatable)")
    verify.add_argument("--workers", type=int, default=4, metavar="N", help="files checked in parallel (4)")
    verify.set_defaults(run=_verify)

    promote = actions.add_parser(
        "promote", help="copy a step to another tier, checking every file",
        description="Copy a committed step from SRC to DST, checking every file on the way, and commit it on DST "
                    "(its manifest last).")
    promote.add_argument("source", metavar="SRC", help="the tier to copy from")
    promote.add_argument("target", metavar="DST", help="the tier to copy to")
    promote.add_argument("--step", type=int, metavar="N", help="the step (default: the newest on SRC)")
    promote.add_argument("--workers", type=int, default=4, metavar="N", help="files copied in parallel (4)")
    promote.set_defaults(run=_promote)

    gc = actions.add_parser(
        "gc", help="delete old steps by a retention rule, and leftovers of dead writers",
        description="Delete the steps a retention rule does not keep (--keep-last, --keep-every), and the "
                    "leftovers of writers whose lease has expired. --dry-run only says what it would delete.")
    gc.add_argument("url", metavar="URL", help="the tier (a directory or s3:// URL)")
    gc.add_argument("--keep-last", type=int, metavar="K", help="keep the newest K steps")
    gc.add_argument("--keep-every", type=int, metavar="M", help="keep every step that is a multiple of M")
    gc.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    gc.set_defaults(run=_gc)

    show = actions.add_parser(
        "show", help="the tree of a step: arrays with shapes and dtypes, JSON values",
        description="Print the state tree of a step from its manifest: each array's dtype, shape, size and "
                    "layout, each JSON value, each object's type.")
    show.add_argument("url", metavar="URL", help="the tier (a directory or s3:// URL)")
    show.add_argument("--step", type=int, metavar="N", help="the step (default: the newest)")
    show.set_defaults(run=_show)

    for action in (ls, verify, promote, gc, show):
        action.add_argument("--json", action="store_true", help="print one JSON document")


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).isoformat(sep=" ", timespec="seconds")


def _ls(args: argparse.Namespace) -> int:
    tiers = {url: list_steps(url) for url in args.urls}
    if not any(tiers.values()):
        if args.json:
            print_json([])
        print(f"trainio: error: no committed checkpoint step in {', '.join(args.urls)}", file=sys.stderr)
        return 1
    if args.json:
        print_json([{"tier": url, "step": s.step, "time": s.time, "bytes": s.nbytes, "files": s.files,
                     "arrays": s.arrays, "verified": s.verified, "error": s.error, "metrics": s.metrics}
                    for url, infos in tiers.items() for s in infos])
        return 0
    print(f"{'step':>12}  {'saved':19}  {'size':>9}  {'files':>6}  status      tier  metrics")
    for url, infos in tiers.items():
        for s in infos:
            status = "damaged" if s.error else "verified" if s.verified else "committed"
            when = _when(s.time) if not s.error else "-"
            metrics = " ".join(f"{name}={value:g}" for name, value in sorted(s.metrics.items()))
            print(f"{s.step:>12}  {when:19}  {human_bytes(s.nbytes):>9}  {s.files:>6}  {status:10}  {url}  {metrics}"
                  .rstrip())
            if s.error:
                print(f"{'':>14}{s.error}", file=sys.stderr)
    return 1 if any(s.error for infos in tiers.values() for s in infos) else 0


def _verify(args: argparse.Namespace) -> int:
    with byte_bar("verify", None, quiet=args.json) as advance:
        report = verify_checkpoint(args.url, args.step, threads=args.workers, progress=advance)
    if not report.steps:
        raise ValueError(f"{report.url}: no committed step to verify")
    if args.json:
        print_json({"url": report.url, "ok": report.ok, "steps": report.steps, "files": report.files,
                    "bytes": report.nbytes, "unrecorded": report.unrecorded,
                    "problems": [{"step": s, "file": k, "reason": r} for s, k, r in report.problems]})
    else:
        for step, key, reason in report.problems:
            print(f"trainio: error: {report.url}: step {step}: {key}: {reason}", file=sys.stderr)
        if report.unrecorded:
            print(f"trainio: warning: {report.url}: {report.unrecorded}", file=sys.stderr)
        if report.ok:
            print(f"ok: {report.url}: {len(report.steps)} step(s), {report.files} files "
                  f"({human_bytes(report.nbytes)}) verified")
    return 0 if report.ok else 1


def _promote(args: argparse.Namespace) -> int:
    manifest = promote_step(args.source, args.target, args.step, threads=args.workers)
    if args.json:
        print_json({"step": manifest.step, "source": args.source, "target": args.target, "bytes": manifest.nbytes,
                    "files": len(manifest.files) + 1})
    else:
        print(f"ok: step {manifest.step} ({human_bytes(manifest.nbytes)}) copied to {args.target}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    if args.keep_last is None and args.keep_every is None:
        raise ValueError("give --keep-last and/or --keep-every (without a rule every step is kept)")
    report = collect_garbage(args.url, keep_last=args.keep_last, keep_every=args.keep_every, dry_run=args.dry_run)
    if args.json:
        print_json({"url": args.url, "dry_run": args.dry_run, "deleted": report.deleted, "debris": report.debris})
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {len(report.deleted)} step(s) {report.deleted} and {len(report.debris)} leftover(s)")
    return 0


def _show(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.url, args.step)
    nodes = list(walk_tree(manifest))
    if args.json:
        def entry(keys: tuple[Any, ...], kind: str, detail: Any) -> dict[str, Any]:
            doc: dict[str, Any] = {"keys": list(keys), "kind": kind}
            if isinstance(detail, ArraySpec):
                doc.update(path=detail.path, dtype=detail.dtype, stored=detail.stored, shape=list(detail.shape),
                           chunks=list(detail.chunks), type=detail.kind, bytes=detail.nbytes,
                           codec=detail.codec)
            elif kind == "value":
                doc["value"] = detail
            elif kind == "object":
                doc["type"] = detail
            return doc

        print_json({"step": manifest.step, "time": manifest.time, "bytes": manifest.nbytes,
                    "world_size": manifest.world_size, "nodes": [entry(*n) for n in nodes]})
        return 0
    print(f"step {manifest.step}, saved {_when(manifest.time)}, {human_bytes(manifest.nbytes)} "
          f"in {len(manifest.arrays)} arrays")
    for keys, kind, detail in nodes:
        if not keys:
            continue
        indent = "  " * (len(keys) - 1)
        name = repr(keys[-1]) if not isinstance(keys[-1], str) else keys[-1]
        if isinstance(detail, ArraySpec):
            codec = f", {detail.codec}" if detail.codec else ""
            text = f"{detail.dtype}{list(detail.shape)}  {human_bytes(detail.nbytes)}  ({detail.kind}{codec})"
        elif kind == "value":
            text = repr(detail)
        elif kind == "object":
            text = f"<{detail}>"
        else:
            text = f"{kind} of {detail}"
        print(f"{indent}{name}: {text}")
    return 0
