"""Throughput of trainio's stores against the plain way of moving the same bytes.

Local: LocalStore.put / put_file / get_file against write (or shutil.copyfile)
+ fsync + os.replace + directory fsync, the same durability; get (new memory)
against Path.read_bytes() (new memory); get_into against readinto into the same
preallocated, already-touched buffer. Reads are page-cache warm.
S3, on a SeaweedFS server started here on loopback (and always stopped):
put / put_file against boto3's upload_file, get / get_into / get_file against
download_file, with a TransferConfig of S3Store's part size, threshold and
concurrency; and get_into against hand-written parallel ranged GETs.

Trainio and baseline alternate (each goes first on every other repeat), and
every result is checked against the source's xxh3-128 outside the timed
region. The table shows the median (``--stat best``: the fastest) of
``--repeat`` runs; ``--json`` prints every run. GB is 10**9 bytes.

Run:  python benchmarks/storage_bench.py [--size 1GB] [--local-dir DIR] [--repeat 3]
      [--stat median|best] [--json] [--only local|s3] [--part-size 16MiB]
      [--concurrency 16] [--checksums when_supported|when_required]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import numpy as np
import xxhash
from boto3.s3.transfer import TransferConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests._seaweedfs

import _report as harness  # type: ignore[import-not-found]  # noqa: E402  # beside this script
from _files import fsync_path  # type: ignore[import-not-found]  # beside this script

from tests._seaweedfs import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS, weed_binary  # noqa: E402
from trainio.loaders import parse_size  # noqa: E402
from trainio.storage import LocalStore, S3Options, S3Store, digest  # noqa: E402

_BUCKET = "bench"
VERSIONS = ("boto3", "botocore", "s3transfer", "torch", "numpy", "trainio")
_BLOCK = 64 << 20
NOTES = [
    "GB/s = 10**9 bytes / the {stat} seconds of --repeat runs; trainio and baseline alternate, and every "
    "run starts after os.sync().",
    "Local reads are page-cache warm. 'new bytes': both contenders read into freshly allocated memory and "
    "pay its first-touch page faults; 'prealloc': both fill one buffer allocated and touched before timing.",
    "Targets: local within 10% of the raw baseline (ratio >= 0.90); S3 (issue 2) get >= 1.5x and put >= 1.0x "
    "boto3's transfer manager with the same part size, threshold and concurrency.",
    "s3 put reads from memory, put_file and upload_file from a page-cache-warm file; download_file writes a "
    "file without fsync, get_file fsyncs it; the ranged-GET row is a reference without a target.",
]


@dataclass
class Contender(harness.Contender):
    """One way of doing an operation: ``run`` is timed; ``setup`` and ``check(result)`` are not (its times are
    kept on the Row, as one baseline serves several rows)."""

    run: Callable[[], object]
    check: Callable[[object], None]
    setup: Callable[[], None] = lambda: None


@dataclass
class Row:
    """One operation measured for trainio and for its baseline."""

    operation: str
    baseline: str
    target: float | None  # the least acceptable trainio/baseline ratio; None: for reference only
    ours_s: list[float] = field(default_factory=list)
    theirs_s: list[float] = field(default_factory=list)


def measure(row: Row, ours: Contender, theirs: Contender, repeat: int, *, warm: bool) -> Row:
    """Time both contenders ``repeat`` times each (after one untimed run each if ``warm``), alternating."""
    for contender in (ours, theirs) if warm else ():
        contender.setup()
        contender.check(contender.run())
    for i in range(repeat):
        for contender, times in harness.in_turn([(ours, row.ours_s), (theirs, row.theirs_s)], i):
            contender.setup()
            seconds, result = harness.clocked(contender.run, sync=True)
            times.append(seconds)
            contender.check(result)
            del result
    print(f"  measured {row.operation} vs {row.baseline}", file=sys.stderr)
    return row


def raw_put(path: Path, data: bytes) -> None:
    """Write, fsync, os.replace, fsync the directory: the durability LocalStore.put gives."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb", buffering=0) as f:
        view, done = memoryview(data), 0
        while done < view.nbytes:
            done += f.write(view[done:]) or 0
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def raw_copy(src: Path, dst: Path) -> None:
    """shutil.copyfile (sendfile on Linux) to a temp file, fsync, os.replace, fsync the directory."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    fsync_path(tmp)
    os.replace(tmp, dst)
    fsync_path(dst.parent)


def fill(readinto: Callable[[memoryview], int | None], view: memoryview) -> None:
    """Call ``readinto`` until ``view`` is full."""
    done = 0
    while done < view.nbytes:
        n = readinto(view[done:])
        if not n:
            raise OSError(f"the source ended after {done} of {view.nbytes} bytes")
        done += n


def raw_readinto(path: Path, buffer: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        fill(f.readinto, buffer)


def ranged_readinto(client: Any, pool: ThreadPoolExecutor, key: str, buffer: memoryview, part: int) -> None:
    """The hand-written fast path: parallel ranged GETs, each read straight into its slice of ``buffer``."""

    def fetch(pos: int) -> None:
        view = buffer[pos:pos + part]
        fill(client.get_object(Bucket=_BUCKET, Key=key, Range=f"bytes={pos}-{pos + view.nbytes - 1}")["Body"].readinto,
             view)

    list(pool.map(fetch, range(0, buffer.nbytes, part)))


class Checks:
    """Digest checks of what a run produced, all against the source bytes' xxh3-128."""

    def __init__(self, data: bytes, buffer: memoryview) -> None:
        self.want = digest(data)
        self.buffer = buffer

    def expect(self, actual: str, what: object) -> None:
        if actual != self.want:
            raise SystemExit(f"benchmark aborted: {what} has xxh3-128 {actual}, expected {self.want}")

    def file(self, path: Path) -> Callable[[object], None]:
        def check(_: object) -> None:
            hasher = xxhash.xxh3_128()
            with open(path, "rb", buffering=0) as f:
                while block := f.read(_BLOCK):
                    hasher.update(block)
            self.expect(str(hasher.hexdigest()), path)
        return check

    def result(self, result: object) -> None:
        self.expect(digest(result), "the bytes returned")  # type: ignore[arg-type]

    def filled(self, _: object) -> None:
        self.expect(digest(self.buffer), "the buffer read into")

    def poison(self) -> None:
        """Overwrite the buffer (untimed) so a read that writes nothing fails its check."""
        np.frombuffer(self.buffer, dtype=np.uint8)[:] = 0xA5


def unlink(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def local_rows(root: Path, data: bytes, src: Path, ck: Checks, repeat: int) -> list[Row]:
    """LocalStore against raw file I/O, in ``root``."""
    store, raw = LocalStore(root / "store"), root / "raw"
    raw.mkdir()
    store.put("obj", data)
    raw_put(raw / "obj", data)
    ours_out, raw_out, buf = root / "out-trainio", root / "out-raw", ck.buffer
    rows = [
        measure(Row("local put", "write+fsync+replace+dir fsync", 0.9),
                Contender(lambda: store.put("p", data), ck.file(store.path_of("p")), lambda: store.delete("p")),
                Contender(lambda: raw_put(raw / "p", data), ck.file(raw / "p"), lambda: unlink(raw / "p")),
                repeat, warm=False),
        measure(Row("local get -> new bytes", "Path.read_bytes() -> new bytes", 0.9),
                Contender(lambda: store.get("obj"), ck.result),
                Contender((raw / "obj").read_bytes, ck.result), repeat, warm=True),
        measure(Row("local get_into -> prealloc", "readinto -> same prealloc", 0.9),
                Contender(lambda: store.get_into("obj", buf), ck.filled, ck.poison),
                Contender(lambda: raw_readinto(raw / "obj", buf), ck.filled, ck.poison), repeat, warm=True),
        measure(Row("local put_file", "copyfile+fsync+replace+dir fsync", 0.9),
                Contender(lambda: store.put_file("f", src), ck.file(store.path_of("f")), lambda: store.delete("f")),
                Contender(lambda: raw_copy(src, raw / "f"), ck.file(raw / "f"), lambda: unlink(raw / "f")),
                repeat, warm=False),
        measure(Row("local get_file", "copyfile+fsync+replace+dir fsync", 0.9),
                Contender(lambda: store.get_file("obj", ours_out), ck.file(ours_out), lambda: unlink(ours_out)),
                Contender(lambda: raw_copy(raw / "obj", raw_out), ck.file(raw_out), lambda: unlink(raw_out)),
                repeat, warm=False),
    ]
    unlink(ours_out, raw_out)
    store.delete_prefix("")
    shutil.rmtree(raw)
    return rows


def s3_rows(root: Path, data: bytes, src: Path, ck: Checks, repeat: int,
            part: int, concurrency: int) -> tuple[list[Row], dict[str, Any]]:
    """S3Store against boto3's transfer manager, on a SeaweedFS server started (and stopped) here."""
    server = SeaweedFS.start(root / "seaweedfs")
    try:
        threshold = max(S3Options().multipart_threshold_bytes, part)
        store = S3Store(_BUCKET, options=S3Options(
            endpoint_url=server.endpoint, region=REGION, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
            part_size_bytes=part, multipart_threshold_bytes=threshold, max_concurrency=concurrency))
        client = boto3.session.Session().client(  # a connection pool as big as S3Store's
            "s3", endpoint_url=server.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            region_name=REGION, config=botocore.config.Config(max_pool_connections=2 * concurrency + 2))
        transfer = TransferConfig(multipart_threshold=threshold, multipart_chunksize=part, max_concurrency=concurrency)
        client.create_bucket(Bucket=_BUCKET)
        store.put("obj", data)
        names = (f"put-{i}" for i in itertools.count())
        key, out, buf = [""], root / "download", ck.buffer

        def upload(fn: Callable[[str], object]) -> Contender:
            """A fresh key per upload, read back and checked (untimed), then deleted."""
            def run() -> object:
                key[0] = next(names)
                return fn(key[0])

            def check(_: object) -> None:
                ck.expect(digest(store.get(key[0])), f"s3://{_BUCKET}/{key[0]}")
                store.delete(key[0])
            return Contender(run, check)

        def downloaded(result: object) -> None:
            ck.file(out)(result)
            unlink(out)

        upload_file = upload(lambda k: client.upload_file(str(src), _BUCKET, k, Config=transfer))
        download_file = Contender(lambda: client.download_file(_BUCKET, "obj", str(out), Config=transfer), downloaded)
        with ThreadPoolExecutor(concurrency) as pool:
            rows = [
                measure(Row("s3 put (from memory)", "upload_file", 1.0),
                        upload(lambda k: store.put(k, data)), upload_file, repeat, warm=False),
                measure(Row("s3 put_file", "upload_file", 1.0),
                        upload(lambda k: store.put_file(k, src)), upload_file, repeat, warm=False),
                measure(Row("s3 get -> new bytes", "download_file", 1.5),
                        Contender(lambda: store.get("obj"), ck.result), download_file, repeat, warm=True),
                measure(Row("s3 get_into -> prealloc", "download_file", 1.5),
                        Contender(lambda: store.get_into("obj", buf), ck.filled, ck.poison), download_file,
                        repeat, warm=True),
                measure(Row("s3 get_file (fsync'd)", "download_file (no fsync)", 1.5),
                        Contender(lambda: store.get_file("obj", out), downloaded), download_file,
                        repeat, warm=False),
                measure(Row("s3 get_into -> prealloc", "ranged GETs readinto prealloc", None),
                        Contender(lambda: store.get_into("obj", buf), ck.filled, ck.poison),
                        Contender(lambda: ranged_readinto(client, pool, "obj", buf, part), ck.filled, ck.poison),
                        repeat, warm=True),
            ]
        store.close()
        weed = subprocess.run([weed_binary(), "version"], capture_output=True, text=True, check=False).stdout
        return rows, {"part_size_bytes": part, "multipart_threshold_bytes": threshold,
                      "max_concurrency": concurrency, "weed": weed.strip().splitlines()[-1]}
    finally:
        server.stop()


def machine(local_dir: Path, size: int) -> dict[str, Any]:
    """What the numbers were measured on, and how fast fresh memory is first touched."""
    start = time.perf_counter()
    fresh = bytearray(size)  # CPython zero-fills it: every page is touched once
    touch_s = time.perf_counter() - start
    del fresh
    return {**harness.machine(VERSIONS), "local_dir": str(local_dir),
            "first_touch_gb_per_s": round(size / touch_s / 1e9, 2)}


def summarize(row: Row, size: int, stat: str) -> dict[str, Any]:
    pick = min if stat == "best" else statistics.median
    ours, theirs = size / pick(row.ours_s) / 1e9, size / pick(row.theirs_s) / 1e9
    return {
        "operation": row.operation, "baseline": row.baseline,
        "trainio_gb_per_s": round(ours, 3), "baseline_gb_per_s": round(theirs, 3), "ratio": round(ours / theirs, 3),
        "target": row.target, "met": None if row.target is None else ours / theirs >= row.target,
        "trainio_s": [round(t, 3) for t in row.ours_s], "baseline_s": [round(t, 3) for t in row.theirs_s],
    }


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [*harness.machine_lines(m, m["local_dir"]),
             f"first touch of fresh memory: {m['first_touch_gb_per_s']} GB/s",
             "settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()), ""]
    header = ("operation", "trainio GB/s", "baseline", "baseline GB/s", "ratio", "target", "met?")
    table = [header] + [(
        r["operation"], f"{r['trainio_gb_per_s']:.2f}", r["baseline"], f"{r['baseline_gb_per_s']:.2f}",
        f"{r['ratio']:.3f}", "-" if r["target"] is None else f">= {r['target']:.2f}",
        harness.yes_no(r["met"]),
    ) for r in report["rows"]]
    return harness.report_text(lines + harness.markdown_table(table, left=(0, 2)), report["notes"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1GB"), help="object size (default 1GB)")
    parser.add_argument("--local-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the local files and the SeaweedFS data go (default: the temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contender (default 3)")
    parser.add_argument("--stat", choices=("median", "best"), default="median",
                        help="which of the repeated runs the table shows (default median; the JSON has all)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument("--only", choices=("local", "s3"), help="run one suite only")
    parser.add_argument("--part-size", type=parse_size, default=S3Options().part_size_bytes,
                        help="S3 part size for both contenders (default: S3Options')")
    parser.add_argument("--concurrency", type=int, default=S3Options().max_concurrency,
                        help="S3 parallel requests for both contenders (default: S3Options')")
    parser.add_argument("--checksums", choices=("when_supported", "when_required"),
                        help="botocore's request checksum calculation and response validation, for both "
                             "contenders (default: botocore's own default)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size < 1 or args.concurrency < 1:
        parser.error("--repeat, --size and --concurrency must be >= 1")
    if args.checksums:  # botocore reads these when each client is created
        os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] = args.checksums
        os.environ["AWS_RESPONSE_CHECKSUM_VALIDATION"] = args.checksums

    args.local_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="trainio-bench-", dir=args.local_dir))
    settings: dict[str, Any] = {"size_bytes": args.size, "repeat": args.repeat, "statistic": args.stat,
                                "checksums": args.checksums or "botocore default"}
    rows: list[Row] = []
    try:
        info = machine(args.local_dir, args.size)
        data = np.random.default_rng(2).bytes(args.size)
        checks = Checks(data, memoryview(bytearray(args.size)))  # the buffer is zero-filled: touched before timing
        src = root / "source.bin"
        raw_put(src, data)
        if args.only != "s3":
            rows += local_rows(root, data, src, checks, args.repeat)
        if args.only != "local":
            s3, s3_settings = s3_rows(root, data, src, checks, args.repeat, args.part_size, args.concurrency)
            rows += s3
            settings.update(s3_settings)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {"machine": info, "settings": settings, "rows": [summarize(r, args.size, args.stat) for r in rows],
              "notes": [note.format(stat=args.stat) for note in NOTES]}
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
