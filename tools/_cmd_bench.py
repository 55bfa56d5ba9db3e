"""``trainio bench``: the whole job on local defaults: a dataset made, verified and streamed, a state checkpointed."""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trainio.storage import StoreError, open_store

from . import _bench_run as bench
from ._format import human_bytes, parse_size
from ._progress import byte_bar, stage_bar

EXAMPLES = """\
examples:
  trainio bench                                   # 2 GB of tokens in a temp dir, two local checkpoint tiers
  trainio bench --size 8GB --workload images --dir /nvme/scratch
  trainio bench --store s3://bucket/scratch --json
  trainio bench --plot bench.png --keep
"""


def register(commands: Any) -> None:
    """Add the ``bench`` subcommand."""
    parser = commands.add_parser(
        "bench", help="make, verify and stream a dataset, checkpoint a state; compare with this machine's limits",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a synthetic dataset, verify it, stream one epoch through StreamingDataset + Loader, "
                    "save a transformer-shaped state through two checkpoint tiers and restore it bit for bit, "
                    "and measure memcpy, page-cache reads and write+fsync of the same bytes in the same run.")
    parser.add_argument("--dir", metavar="DIR", help="where to work (default: a temp dir); removed afterwards "
                        "unless --keep")
    parser.add_argument("--size", type=parse_size, default=2_000_000_000, metavar="SIZE",
                        help="dataset size, e.g. 64MB or 2GB (default 2GB); the checkpoint is as big, or less "
                             "where free memory is short")
    parser.add_argument("--workload", choices=("tokens", "images"), default="tokens",
                        help="tokens: 2048 int32 tokens a sample; images: 8-32 KB byte strings (default tokens)")
    parser.add_argument("--store", metavar="URL", help="put the second checkpoint tier here (e.g. s3://bucket/x)")
    parser.add_argument("--rounds", type=int, default=3, metavar="N",
                        help="runs of each figure and of its limit, in turn; the median is shown (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document (one line) and no progress")
    parser.add_argument("--plot", metavar="FILE.png", help="write loader throughput and the checkpoint timeline "
                        "(needs matplotlib)")
    parser.add_argument("--keep", action="store_true", help="keep the dataset and checkpoints")
    parser.set_defaults(run=run)


def _workdir(parent: str | None) -> Path:
    if parent is None:
        return Path(tempfile.mkdtemp(prefix="trainio-bench-"))
    os.makedirs(parent, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="trainio-bench-", dir=parent))


def _second_tier(url: str | None, work: Path) -> tuple[str, Any]:
    """The second tier's URL, and its store when it is remote (probed now, so a dead server fails fast)."""
    if url is None:
        return str(work / "ckpt-slow"), None
    store = open_store(f"{url.rstrip('/')}/trainio-bench-{secrets.token_hex(4)}")
    try:
        store.list_dirs()
    except StoreError as exc:
        raise StoreError(url, "", f"cannot reach the checkpoint store: {exc.problem}",
                         "check --store, the endpoint and the credentials") from None
    return store.url, store


def run(args: argparse.Namespace) -> int:
    """Run every phase; print the table (or JSON, and a plot); 0 when the restore was bit-exact."""
    if args.plot:
        _check_plot(args.plot)
    work = _workdir(args.dir)
    remote = None
    try:
        second, remote = _second_tier(args.store, work)
        results = _run_phases(args, work, second)
        if args.plot:
            _plot(results, args.plot)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            if remote is not None:
                remote.delete_prefix("")
    if args.json:
        print(json.dumps(results, separators=(",", ":"), default=str))
    else:
        print(_table(results))
        if args.keep:
            print(f"kept: {work}")
    return 0 if results["checkpoint"]["bit_exact"] and results["dataset"]["verified"] else 1


def _run_phases(args: argparse.Namespace, work: Path, second: str) -> dict[str, Any]:
    import torch

    from trainio.checkpoint import Tier

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quiet = args.json
    with byte_bar("dataset", args.size, quiet=quiet) as advance:
        data = bench.make_dataset(work, args.workload, args.size, args.rounds, lambda n: advance(n))
    streams = {}
    for cold in (False, True):
        with byte_bar("stream " + ("cold" if cold else "warm"), data.bytes, quiet=quiet) as advance:
            streams["cold" if cold else "warm"] = bench.stream_epochs(work / "dataset", device, args.rounds, cold,
                                                                    lambda n: advance(n))
    state = bench.transformer_state(bench.checkpoint_bytes(args.size))
    tiers = [Tier(work / "ckpt-fast", keep_last=2), Tier(second, keep_last=2)]
    with stage_bar("checkpoint", 4, quiet=quiet) as stage:
        ckpt = bench.checkpoint_rounds(state, tiers, work, args.rounds, stage)
    loader = {name: {"device": device, "samples": r.samples, "bytes": r.bytes, "seconds": r.seconds,
                     "samples_per_s": r.samples / r.seconds, "bytes_per_s": r.bytes_per_s, "wait_s": r.wait_s,
                     "limit_s": r.limit_s, "limit_bytes_per_s": r.limit_bytes_per_s,
                     "timeline": [[round(t, 4), b] for t, b in r.timeline]}
              for name, r in streams.items()}
    results = {
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": device, "dir": str(work), "rounds": args.rounds},
        "workload": args.workload,
        "dataset": {**asdict(data), "write_bytes_per_s": data.bytes / data.write_s,
                    "write_limit_bytes_per_s": data.bytes / data.write_limit_s,
                    "verify_bytes_per_s": data.bytes / data.verify_s},
        "loader": loader,
        "checkpoint": asdict(ckpt),
    }
    results["ratios"] = {name: ratio for name, _, _, ratio in _rows(results) if ratio is not None}
    return results


def _rows(results: dict[str, Any]) -> list[tuple[str, str, str, float | None]]:
    """(measure, trainio, limit, trainio's share of the limit: 1 at the limit) of every row of the table."""
    data, loader, ckpt = results["dataset"], results["loader"], results["checkpoint"]
    rows: list[tuple[str, str, str, float | None]] = [
        ("dataset write", f"{human_bytes(data['write_bytes_per_s'])}/s",
         f"{human_bytes(data['write_limit_bytes_per_s'])}/s", data["write_limit_s"] / data["write_s"]),
        ("dataset verify (hash)", f"{human_bytes(data['verify_bytes_per_s'])}/s", "", None),
    ]
    for name, run in loader.items():
        rows.append((f"loader -> {run['device']}, first epoch, {name}", f"{human_bytes(run['bytes_per_s'])}/s",
                     f"{human_bytes(run['limit_bytes_per_s'])}/s", run["limit_s"] / run["seconds"]))
    warm = loader["warm"]
    rows += [
        ("loader samples/s (warm)", f"{warm['samples_per_s']:,.0f}", "", None),
        ("consumer waited (warm)", f"{warm['wait_s']:.2f} s of {warm['seconds']:.2f} s", "", None),
        ("first save blocked", f"{ckpt['first_blocked_s']:.3f} s", "", None),
        ("staging reserved ahead", f"{ckpt['reserve_s']:.3f} s", "", None),
        ("first save blocked, reserved", f"{ckpt['reserved_first_blocked_s']:.3f} s", f"{ckpt['memcpy_s']:.3f} s",
         ckpt["memcpy_s"] / ckpt["reserved_first_blocked_s"]),
        ("save blocked", f"{ckpt['blocked_s']:.3f} s", f"{ckpt['memcpy_s']:.3f} s",
         ckpt["memcpy_s"] / ckpt["blocked_s"]),
        ("committed (tier 1)", f"{ckpt['commit_s']:.3f} s", f"{ckpt['write_fsync_s']:.3f} s",
         ckpt["write_fsync_s"] / ckpt["commit_s"]),
    ]
    remote = not ckpt["read_s"]
    rows += [
        ("promoted (tier 2)", f"{ckpt['promote_s']:.3f} s", "" if remote else f"{ckpt['copy_s']:.3f} s",
         None if remote else ckpt["copy_s"] / ckpt["promote_s"]),
        ("restore (tier 2)", f"{ckpt['restore_s']:.3f} s", "" if remote else f"{ckpt['read_s']:.3f} s",
         None if remote else ckpt["read_s"] / ckpt["restore_s"]),
        ("restore bit-exact", "yes" if ckpt["bit_exact"] else "NO", "", None),
    ]
    return rows


def _table(results: dict[str, Any]) -> str:
    data, ckpt = results["dataset"], results["checkpoint"]
    rows = [(name, ours, limit, "" if ratio is None else f"{ratio:.2f}x" + (" (!)" if ratio > 1.0 else ""))
            for name, ours, limit, ratio in _rows(results)]
    work = results["machine"]["dir"]
    tiers = [t.removeprefix(work).lstrip("/") or t for t in ckpt["tiers"]]
    head = ("measure", "trainio", "limit", "vs limit")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    lines = [f"in {work}: {results['machine']['cpus']} CPUs, {results['machine']['rounds']} rounds a row",
             f"dataset: {data['rows']:,} {results['workload']} samples, {human_bytes(data['bytes'])} in "
             f"{data['shards']} shards, verified {'ok' if data['verified'] else 'FAILED'}; checkpoint: "
             f"{ckpt['tensors']} tensors, {human_bytes(ckpt['bytes'])}, tiers {' -> '.join(tiers)}",
             "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append("Each figure is the median of its rounds, run in turn with its limit (the fastest of its rounds) on "
                 "the same bytes: "
                 "new files of the shard size (dataset) or of the chunk size with the manager's threads "
                 "(checkpoint) written and made durable (fsync each; write-back started on each, all made durable "
                 "together at the end; or one sync: the fastest); the shard files read with the Loader's threads and "
                 "its checker's, "
                 "page cache warm "
                 "(read just before) or cold (dropped just before with posix_fadvise DONTNEED, for both); memcpy "
                 "of the tensors; the step's files read with the manager's threads into memory of their own (all "
                 "advised at once in 8 MiB blocks, or each whole in 256 KiB reads: the faster; a promotion: read, then "
                 "written+fsynced). 1.00x is the limit; (!) marks a figure past its limit, a defect of the "
                 "measurement. A loader epoch is a new StreamingDataset + Loader, every row checked against its digest.")
    return "\n".join(lines)


def _check_plot(path: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'trainio[plot]'") from None
    parent = Path(path).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"--plot {path}: cannot write into {parent}")


def _plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6))
    for name, run in results["loader"].items():
        timeline = run["timeline"]
        step = max(1, len(timeline) // 50)  # the rate over 50 stretches of the epoch, not batch by batch
        points = timeline[::step] + ([timeline[-1]] if timeline and (len(timeline) - 1) % step else [])
        times = [t for t, _ in points[1:]]
        rates = [(b1 - b0) / max(t1 - t0, 1e-9) / 1e9 for (t0, b0), (t1, b1) in zip(points, points[1:])]
        top.plot(times, rates, linewidth=0.8, label=f"{name} page cache")
    top.set(title=f"loader, first epoch ({results['machine']['device']})", xlabel="s since the dataset was opened",
            ylabel="GB/s delivered")
    top.legend(fontsize=8)
    ckpt = results["checkpoint"]
    phases = [("save blocked", 0.0, ckpt["blocked_s"]), ("commit tier 1", 0.0, ckpt["commit_s"]),
              ("promote tier 2", ckpt["commit_s"], ckpt["promote_s"]),
              ("restore", ckpt["commit_s"] + ckpt["promote_s"], ckpt["restore_s"])]
    for i, (name, start, length) in enumerate(phases):
        bottom.barh(i, length, left=start)
        bottom.text(start + length, i, f" {name} {length:.2f} s", va="center", fontsize=8)
    bottom.set(title=f"checkpoint of {human_bytes(ckpt['bytes'])}", xlabel="s", yticks=[])
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
    print(f"wrote {path}", file=sys.stderr)
