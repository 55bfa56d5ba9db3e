"""``trainio shard`` streams: a 1M-row Parquet input much larger than the memory it uses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from trainio.loaders import Dataset

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` is the quick lane; .ci/run runs everything

ROWS = 1_000_000
TOKENS = 128  # 512 bytes of int32 per row: about 520 MB of row data in all
CHUNK = 50_000


def _write_input(path: Path) -> int:
    rng = np.random.default_rng(7)
    schema = pa.schema([("id", pa.int64()), ("tokens", pa.list_(pa.int32()))])
    with pq.ParquetWriter(path, schema, compression="snappy") as writer:
        for start in range(0, ROWS, CHUNK):
            values = rng.integers(0, 50_000, size=CHUNK * TOKENS, dtype=np.int32)
            offsets = pa.array(np.arange(0, CHUNK * TOKENS + 1, TOKENS, dtype=np.int32))
            tokens = pa.ListArray.from_arrays(offsets, pa.array(values))
            writer.write_table(pa.table({"id": np.arange(start, start + CHUNK), "tokens": tokens}, schema=schema),
                               row_group_size=CHUNK)
    return ROWS * (8 + 4 * TOKENS)


_MEASURE = textwrap.dedent("""
    import json, resource, subprocess, sys
    result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"code": result.returncode, "peak_bytes": peak_kib * 1024, "out": result.stdout,
                      "err": result.stderr[-2000:]}))
""")


def _digests(batches: object) -> tuple[list[int], str]:
    ids: list[int] = []
    hasher = xxhash.xxh3_128()
    for batch in batches:  # type: ignore[attr-defined]
        ids.extend(batch.column("id").to_numpy().tolist())
        hasher.update(batch.column("tokens").flatten().to_numpy())
    return ids, hasher.hexdigest()


def test_a_large_parquet_input_is_sharded_in_bounded_memory(tmp_path: Path) -> None:
    source = tmp_path / "big.parquet"
    row_bytes = _write_input(source)
    trainio = str(Path(sys.executable).parent / "trainio")
    measured = subprocess.run(
        [sys.executable, "-c", _MEASURE, trainio, "shard", str(source), "--out", str(tmp_path / "ds"),
         "--shard-size", "64MB", "--json"],
        capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(measured.stdout)
    assert result["code"] == 0, result["err"]
    assert json.loads(result["out"])["rows"] == ROWS
    limit = row_bytes // 2
    assert result["peak_bytes"] < limit, f"peak RSS {result['peak_bytes'] >> 20} MiB for {row_bytes >> 20} MiB of rows"

    ds = Dataset(str(tmp_path / "ds"))
    assert len(ds) == ROWS and len(ds.shards) >= 6
    want = _digests(pq.ParquetFile(source).iter_batches(batch_size=CHUNK))
    got = _digests(b for i in range(len(ds.shards)) for b in ds.read_shard(i).to_batches())
    assert got[0] == want[0], "ids differ or are out of order"
    assert got[1] == want[1], "token values differ"
