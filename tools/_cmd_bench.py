"""``trainio bench``: the whole job on local defaults: a dataset made, verified and streamed, a state checkpointed."""

from __future__ import annotations

import argparse
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
from ._format import human_bytes, parse_size, print_json
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
    parser.add_argument("--json", action="store_true", help="print one JSON document and no progress")
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
        print_json(results)
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
        data = bench.make_dataset(work / "dataset", args.workload, args.size, lambda n: advance(n))
    with byte_bar("stream", data.bytes, quiet=quiet) as advance:
        stream = bench.stream_epoch(work / "dataset", device, lambda n: advance(n))
    shards = sorted((work / "dataset").rglob("*.arrow"))
    read_s = bench.read_seconds(shards)
    shard_bytes = sum(p.stat().st_size for p in shards)
    state = bench.transformer_state(bench.checkpoint_bytes(args.size))
    tensors = bench.tensors_of(state)
    tiers = [Tier(work / "ckpt-fast", keep_last=2), Tier(second, keep_last=2)]
    with stage_bar("checkpoint", 4, quiet=quiet) as stage:
        ckpt = bench.checkpoint_round(state, tiers, stage)
    memcpy_s = bench.memcpy_limit(tensors)
    write_s, reread_s = bench.write_limit(work, ckpt.bytes)
    limits = {"memcpy_s": memcpy_s, "write_fsync_s": write_s, "page_cache_read_s": reread_s,
              "dataset_read_bytes_per_s": shard_bytes / read_s}
    return {
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": device, "dir": str(work)},
        "workload": args.workload,
        "dataset": {**asdict(data), "write_bytes_per_s": data.bytes / data.write_s,
                    "verify_bytes_per_s": data.bytes / data.verify_s},
        "loader": {"device": stream.device, "samples": stream.samples, "bytes": stream.bytes,
                   "seconds": stream.seconds, "samples_per_s": stream.samples_per_s,
                   "bytes_per_s": stream.bytes_per_s, "wait_s": stream.wait_s,
                   "timeline": [[round(t, 4), b] for t, b in stream.timeline]},
        "checkpoint": asdict(ckpt),
        "limits": limits,
    }


def _ratio(ours: float, limit: float) -> str:
    return f"{ours / limit:.2f}x" if limit > 0 else "-"


def _table(results: dict[str, Any]) -> str:
    data, loader, ckpt, limits = results["dataset"], results["loader"], results["checkpoint"], results["limits"]
    rate = limits["dataset_read_bytes_per_s"]
    write_rate = ckpt["bytes"] / limits["write_fsync_s"]
    copy_s = limits["write_fsync_s"] + limits["page_cache_read_s"]  # a promotion reads tier 1 and writes tier 2
    rows = [
        ("dataset write", f"{human_bytes(data['write_bytes_per_s'])}/s", f"{human_bytes(write_rate)}/s",
         _ratio(data["write_bytes_per_s"], write_rate)),
        ("dataset verify (hash)", f"{human_bytes(data['verify_bytes_per_s'])}/s", "", ""),
        (f"loader -> {loader['device']}", f"{human_bytes(loader['bytes_per_s'])}/s", f"{human_bytes(rate)}/s",
         _ratio(loader["bytes_per_s"], rate)),
        ("loader samples/s", f"{loader['samples_per_s']:,.0f}", "", ""),
        ("consumer waited", f"{loader['wait_s']:.2f} s of {loader['seconds']:.2f} s", "", ""),
        ("first save blocked", f"{ckpt['first_blocked_s']:.3f} s", "", ""),
        ("save blocked", f"{ckpt['blocked_s']:.3f} s", f"{limits['memcpy_s']:.3f} s",
         _ratio(limits["memcpy_s"], ckpt["blocked_s"])),
        ("committed (tier 1)", f"{ckpt['commit_s']:.3f} s", f"{limits['write_fsync_s']:.3f} s",
         _ratio(limits["write_fsync_s"], ckpt["commit_s"])),
        ("promoted (tier 2)", f"{ckpt['promote_s']:.3f} s", f"{copy_s:.3f} s", _ratio(copy_s, ckpt["promote_s"])),
        ("restore (tier 2)", f"{ckpt['restore_s']:.3f} s", f"{limits['page_cache_read_s']:.3f} s",
         _ratio(limits["page_cache_read_s"], ckpt["restore_s"])),
        ("restore bit-exact", "yes" if ckpt["bit_exact"] else "NO", "", ""),
    ]
    work = results["machine"]["dir"]
    tiers = [t.removeprefix(work).lstrip("/") or t for t in ckpt["tiers"]]
    head = ("measure", "trainio", "limit", "vs limit")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    lines = [f"in {work}: {results['machine']['cpus']} CPUs, loader to {loader['device']}",
             f"dataset: {data['rows']:,} {results['workload']} samples, {human_bytes(data['bytes'])} in "
             f"{data['shards']} shards, verified {'ok' if data['verified'] else 'FAILED'}; checkpoint: "
             f"{ckpt['tensors']} tensors, {human_bytes(ckpt['bytes'])}, tiers {' -> '.join(tiers)}",
             "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("limits, same run: write+fsync and page-cache read of the checkpoint's bytes (their sum for a "
                 "promotion), memcpy of its tensors, page-cache read of the dataset's shards. The first save "
                 "allocates the staging memory later saves reuse; the other checkpoint rows are the second save's.")
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

    timeline = results["loader"]["timeline"]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6))
    times = [t for t, _ in timeline]
    rates = [(b1 - b0) / max(t1 - t0, 1e-9) / 1e9 for (t0, b0), (t1, b1) in zip(timeline, timeline[1:])]
    top.plot(times[1:], rates, linewidth=0.8)
    top.set(title=f"loader throughput ({results['loader']['device']})", xlabel="s", ylabel="GB/s")
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
