"""The dataset format: writer and reader round trips, schema checks, and damaged or hostile datasets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from trainio.loaders import Dataset, DatasetWriter
from trainio.storage import (
    AlreadyExists,
    FormatError,
    IntegrityError,
    LocalStore,
    NotFound,
    S3Store,
    SchemaMismatch,
    Store,
)

from .._writers import kill_a_dataset_writer_midway
from ._damage import edit_index


def make_row(i: int) -> dict[str, object]:
    return {
        "id": i,
        "score": i / 4,
        "flag": i % 3 == 0,
        "text": f"row {i} ünïcode",
        "blob": bytes([i % 256]) * (i % 7),
        "tokens": np.arange(i % 13, dtype=np.int32) + i,
        "image": np.full((3, 4), i % 250, dtype=np.uint8),
    }


def check_row(got: dict[str, object], i: int) -> None:
    want = make_row(i)
    assert got.keys() == want.keys()
    for name, value in want.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[name], value)  # type: ignore[arg-type]
            assert got[name].dtype == value.dtype  # type: ignore[union-attr]
        else:
            assert got[name] == value, name


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "ds")
    return request.getfixturevalue("s3_store")  # type: ignore[no-any-return]


def test_round_trip_of_every_field_kind(store: Store) -> None:
    with DatasetWriter(store, shard_bytes=4000, batch_rows=16) as writer:
        for i in range(300):
            writer.write(make_row(i))
    ds = Dataset(store)
    assert len(ds) == 300
    assert len(ds.shards) > 3, "small shard_bytes must roll shards"
    assert str(ds.schema.field("tokens").type) == "list<item: int32>"
    assert isinstance(ds.schema.field("image").type, pa.FixedShapeTensorType)
    for i in (0, 1, 17, 150, 299, -1):
        check_row(ds[i], i % 300)
    taken = ds.take([299, 3, 3, 120])
    np.testing.assert_array_equal(taken["id"], [299, 3, 3, 120])
    assert taken["image"].shape == (4, 3, 4)
    assert taken["text"][1] == "row 3 ünïcode"
    np.testing.assert_array_equal(taken["tokens"][0], make_row(299)["tokens"])  # type: ignore[arg-type]
    for shard in range(len(ds.shards)):
        assert ds.read_shard(shard).num_rows == ds.shards[shard].rows


def test_write_batch_and_write_table(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", batch_rows=10) as writer:
        writer.write_batch({"x": np.arange(25), "v": np.ones((25, 2, 2), np.float32)})
        writer.write({"x": 25, "v": np.zeros((2, 2), np.float32)})
        writer.write_table(pa.table({"v": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ones((5, 2, 2), np.float32)),
                                     "x": pa.array(range(26, 31), pa.int32())}))
    ds = Dataset(tmp_path / "ds")
    np.testing.assert_array_equal(ds.take(range(31))["x"], np.arange(31))
    assert ds.schema.field("x").type == pa.int64(), "the int32 column was cast to the schema's int64"
    assert [b.first_row for b in ds.shards[0].batches] == [0, 10, 20, 30], "small writes are re-batched"


def test_explicit_schema_and_compression(tmp_path: Path) -> None:
    schema = pa.schema([("tokens", pa.list_(pa.int16())), ("label", pa.float32())])
    for compression in ("lz4", "zstd"):
        with DatasetWriter(tmp_path / compression, schema, compression=compression) as writer:
            for i in range(100):
                writer.write({"tokens": [i, i + 1], "label": i})
        ds = Dataset(tmp_path / compression)
        assert ds.index.compression == compression
        assert ds[42]["tokens"].dtype == np.int16 and ds[42]["label"] == np.float32(42)


def test_batch_byte_ranges_decode_without_the_footer(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", batch_rows=7, compression="zstd") as writer:
        for i in range(50):
            writer.write(make_row(i))
    ds = Dataset(tmp_path / "ds")
    (shard,) = ds.shards
    raw = (tmp_path / "ds" / shard.path).read_bytes()
    assert len(raw) == shard.bytes
    ids = []
    for batch in shard.batches:
        decoded = ipc.read_record_batch(pa.py_buffer(raw[batch.offset:batch.offset + batch.length]), ds.schema)
        ids.extend(decoded.column("id").to_pylist())
    assert ids == list(range(50))
    assert ipc.open_file(pa.py_buffer(raw)).num_record_batches == len(shard.batches)


@pytest.mark.parametrize(("bad", "field", "expected", "got"), [
    ({"id": 1.5}, "id", "int64", "float 1.5"),
    ({"id": True}, "id", "int64", "bool True"),
    ({"text": b"bytes"}, "text", "string", "bytes"),
    ({"tokens": np.array([1.5])}, "tokens", "list<item: int32>", "float64 array"),
    ({"tokens": np.array([2**40])}, "tokens", "list<item: int32>", "out of range"),
    ({"image": np.zeros((4, 3), np.uint8)}, "image", "shape (3, 4)", "shape (4, 3)"),
    ({"image": np.zeros((3, 4), np.float64)}, "image", "uint8", "float64"),
])
def test_mismatching_rows_are_refused_by_field_type_and_row(
    tmp_path: Path, bad: dict[str, object], field: str, expected: str, got: str
) -> None:
    writer = DatasetWriter(tmp_path / "ds", batch_rows=8)
    for i in range(10):
        writer.write(make_row(i))
    with pytest.raises(SchemaMismatch) as info:
        writer.write({**make_row(10), **bad})
        writer.close()
    assert info.value.field == field and info.value.row == 10
    assert expected in str(info.value) and got in str(info.value)
    writer.write(make_row(11))
    writer.close()
    ds = Dataset(tmp_path / "ds")
    assert list(ds.take(range(len(ds)))["id"]) == [*range(10), 11], "only the bad row is dropped"


def test_missing_and_unknown_fields(tmp_path: Path) -> None:
    writer = DatasetWriter(tmp_path / "ds")
    writer.write({"a": 1, "b": "x"})
    with pytest.raises(SchemaMismatch, match=r"row 1, field 'b': expected string, got nothing"):
        writer.write({"a": 2})
    with pytest.raises(SchemaMismatch, match=r"field 'c': expected no such field"):
        writer.write({"a": 2, "b": "y", "c": 3})
    with pytest.raises(SchemaMismatch, match="columns of one length"):
        writer.write_batch({"a": [1, 2], "b": ["x"]})
    writer.abort()


def test_existing_dataset_is_kept_unless_overwrite(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds") as writer:
        writer.write({"v": 1})
    with pytest.raises(AlreadyExists, match="a dataset already exists"):
        DatasetWriter(tmp_path / "ds")
    assert Dataset(tmp_path / "ds")[0]["v"] == 1
    with DatasetWriter(tmp_path / "ds", overwrite=True) as writer:
        writer.write({"w": "new"})
    assert Dataset(tmp_path / "ds")[0] == {"w": "new"}
    keys = LocalStore(tmp_path / "ds").list()
    assert len(keys) == 2 and keys[0] == "index.json" and "shard-00000.arrow" not in keys[1], keys


def test_a_failed_overwrite_keeps_the_old_dataset(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", shard_bytes=1000) as writer:
        for i in range(100):
            writer.write(make_row(i))
    before = LocalStore(tmp_path / "ds").list()
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path / "ds", overwrite=True, shard_bytes=1000) as writer:
            for i in range(50):
                writer.write(make_row(1000 + i))
            raise RuntimeError("the new write died")
    assert LocalStore(tmp_path / "ds").list() == before
    ds = Dataset(tmp_path / "ds")
    check_row(ds[99], 99)
    assert all(ds.read_shard(i).num_rows for i in range(len(ds.shards)))


def test_an_exception_in_the_block_leaves_no_dataset(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path / "ds", shard_bytes=100) as writer:
            for i in range(100):
                writer.write(make_row(i))
            raise RuntimeError("the job died")
    assert LocalStore(tmp_path / "ds").list() == []
    with pytest.raises(NotFound, match="index.json is missing"):
        Dataset(tmp_path / "ds")


def test_a_killed_writer_leaves_no_dataset_and_the_next_one_cleans_up(tmp_path: Path) -> None:
    kill_a_dataset_writer_midway(tmp_path / "ds")
    store = LocalStore(tmp_path / "ds")
    assert store.list("shards"), "the killed writer had finished some shards"
    with pytest.raises(NotFound, match="index.json is missing"):
        Dataset(store)
    with DatasetWriter(store) as writer:
        writer.write({"id": 1})
    assert store.list() == ["index.json", "shards/shard-00000.arrow", "shards/shard-00000.rows"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_every_shard_is_made_durable_before_the_index_commits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        events.append("fsync " + os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), tmp_path / "ds"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with DatasetWriter(tmp_path / "ds", shard_bytes=64 << 10, batch_rows=8) as writer:
        for _ in range(4):
            writer.write_batch({"tokens": pa.array([np.arange(4096, dtype=np.int32)] * 8)})
        finished = writer.store.list("shards")
        assert len(finished) >= 3 and not any(e.startswith("fsync shards/") for e in events), (
            "finished shards are flushed together at the end, not one by one")
        events.append("closing")
    shards = [e for e in events if e.startswith("fsync shards/shard-")]
    index = events.index(next(e for e in events if e.startswith("fsync .trainio-tmp.") or e == "fsync index.json"))
    assert sorted(shards) == [f"fsync {key}" for key in LocalStore(tmp_path / "ds").list("shards")]
    assert events.index("closing") < min(events.index(e) for e in shards)
    assert max(events.index(e) for e in shards) < events.index("fsync shards") < index


def _write_small(path: Path) -> Dataset:
    with DatasetWriter(path, batch_rows=10) as writer:
        for i in range(40):
            writer.write(make_row(i))
    return Dataset(path)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["shards"][0].update(path="../../etc/passwd"), r"shards\[0\]\.path: '../../etc/passwd' is not a path inside"),
    (lambda d: d["shards"][0].update(path="/etc/passwd"), r"shards\[0\]\.path"),
    (lambda d: d["shards"][0].update(path="index.json"), r"is not under shards/"),
    (lambda d: d.update(rows=d["rows"] + 1), r"rows: is 41 but the shards hold 40 rows"),
    (lambda d: d["shards"][0].update(rows=39), r"rows: is 40 but the shards hold 39"),
    (lambda d: d.update(format="webdataset"), r"format: is 'webdataset'"),
    (lambda d: d.update(version=3), r"version: is 3.*upgrade trainio"),
    (lambda d: d["shards"][0].update(xxh3_128="nothex"), r"xxh3_128"),
    (lambda d: d["shards"][0]["batches"][1].__setitem__(1, 10**9), r"batches\[1\]"),
    (lambda d: d["schema"].update(arrow_ipc_base64="AAAA"), r"schema"),
])
def test_hand_edited_index_is_refused(tmp_path: Path, edit: object, message: str) -> None:
    _write_small(tmp_path / "ds")
    edit_index(tmp_path / "ds", edit)  # sealed again: the index's own validation refuses it
    with pytest.raises(FormatError, match=message) as info:
        Dataset(tmp_path / "ds")
    assert info.value.key == "index.json"


def test_index_that_is_not_json(tmp_path: Path) -> None:
    _write_small(tmp_path / "ds")
    (tmp_path / "ds" / "index.json").write_bytes(b"\x00garbage")
    with pytest.raises(FormatError, match="not valid JSON"):
        Dataset(tmp_path / "ds")


def test_flipped_byte_in_a_shard_is_caught_by_a_whole_shard_read(tmp_path: Path) -> None:
    ds = _write_small(tmp_path / "ds")
    path = tmp_path / "ds" / ds.shards[0].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        Dataset(tmp_path / "ds").read_shard(0)
    assert info.value.key == "shards/shard-00000.arrow"


def test_truncated_shard_is_refused_on_random_access(tmp_path: Path) -> None:
    ds = _write_small(tmp_path / "ds")
    path = tmp_path / "ds" / ds.shards[0].path
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FormatError, match="the index says"):
        Dataset(tmp_path / "ds")[0]


def test_remote_random_access_reads_only_the_batch(s3_store: S3Store) -> None:
    with DatasetWriter(s3_store, batch_rows=10) as writer:
        for i in range(100):
            writer.write(make_row(i))
    ds = Dataset(s3_store)
    check_row(ds[55], 55)
    with pytest.raises(IndexError, match="out of range"):
        ds[100]


def test_schema_only_dataset_is_empty(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", pa.schema([("x", pa.int64())])):
        pass
    ds = Dataset(tmp_path / "ds")
    assert len(ds) == 0 and ds.shards == ()
    empty = ds.take([])
    assert list(empty) == ["x"] and len(empty["x"]) == 0


def test_decoding_a_batch_for_its_samples_imports_no_pandas(tmp_path: Path) -> None:
    """pyarrow's ``to_numpy`` imports pandas: a third of a second in every new worker process."""
    import subprocess

    with DatasetWriter(tmp_path / "ds", batch_rows=4) as writer:
        writer.write_batch({"id": np.arange(8, dtype=np.int64), "f": np.arange(8, dtype=np.float16),
                            "tokens": [np.arange(i, dtype=np.int32) for i in range(8)], "raw": [b"ab"] * 8})
    shard = tmp_path / "ds" / Dataset(tmp_path / "ds").shards[0].path
    script = (
        "import sys, pyarrow.ipc as ipc\n"
        "from trainio.loaders._format.columns import Columns, sample_of\n"
        f"batch = ipc.open_file({str(shard)!r}).get_batch(1)\n"
        "columns = Columns.of(batch)\n"
        "assert 'pandas' not in sys.modules, 'pandas was imported'\n"
        "print(columns.fixed['id'].tolist(), columns.fixed['f'].tolist(), sample_of(columns)(1)['tokens'].tolist())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "[4, 5, 6, 7] [4.0, 5.0, 6.0, 7.0] [0, 1, 2, 3, 4]"
