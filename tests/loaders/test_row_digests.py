"""Row digests: every row of a local shard checked against its own XXH3-64 where it is read, by every reader, in
every way the Loader copies rows; the digests file checked against the index; and what a shard without them gets."""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import xxhash

from trainio.loaders import (
    Dataset,
    DatasetWriter,
    Loader,
    LoaderError,
    StreamingDataset,
    verify_dataset,
)
from trainio.loaders._batch import gather, row_hash, transform_worker
from trainio.loaders._read import shard_check
from trainio.storage import FormatError, IntegrityError, NotFound

from ._damage import drop_row_digests, edit_index, flip_bit

pytestmark = pytest.mark.timeout(120)

NATIVE = pytest.mark.skipif(gather._native is None, reason="the C copy routine was not built here")


def xxh64(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


@pytest.fixture(autouse=True)
def nothing_checked_yet() -> Iterator[None]:
    shard_check.forget_verified()
    yield
    shard_check.forget_verified()


# -- the routines ------------------------------------------------------------------------------------------------


@NATIVE
def test_the_c_routine_hashes_a_row_then_copies_it_and_stops_at_the_first_that_does_not_match() -> None:
    source = np.frombuffer(bytes(range(256)) * 64, dtype=np.uint8)
    sizes = np.array([0, 1, 17, 240, 241, 5000], dtype=np.int64)
    addresses = source.ctypes.data + np.array([0, 3, 9, 100, 7, 2000], dtype=np.int64)
    expected = [xxh64(source[a - source.ctypes.data:a - source.ctypes.data + n].tobytes())
                for a, n in zip(addresses.tolist(), sizes.tolist())]
    found = np.zeros(sizes.size, dtype=np.uint64)
    gather._native.digests(found, addresses, sizes)
    assert found.tolist() == expected
    starts = np.concatenate(([0], np.cumsum(sizes[:-1]))).astype(np.int64)
    out = np.zeros(int(sizes.sum()), dtype=np.uint8)
    assert gather._native.copy_checked(out, starts, addresses, sizes, found) == -1
    assert out.tobytes() == b"".join(source[a - source.ctypes.data:][:n].tobytes()
                                     for a, n in zip(addresses.tolist(), sizes.tolist()))
    wrong = found.copy()
    wrong[3] ^= 1
    out[:] = 0xEE
    assert gather._native.copy_checked(out, starts, addresses, sizes, wrong) == 3
    assert out[:int(starts[3])].tobytes() == b"".join(source[a - source.ctypes.data:][:n].tobytes()
                                                      for a, n in zip(addresses[:3].tolist(), sizes[:3].tolist()))
    assert set(out[int(starts[4]):].tolist()) == {0xEE}  # the rows after it not copied
    with pytest.raises(ValueError, match="digests has 2 items"):
        gather._native.copy_checked(out, starts, addresses, sizes, found[:2])


@NATIVE
def test_long_rows_are_hashed_as_xxh3_while_they_are_streamed_whatever_their_length_and_alignment() -> None:
    rng = np.random.default_rng(7)
    source = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    sizes = np.array([2047, 2048, 2049, 3071, 3072, 3073, 4095, 4096, 4097, 8192, 8193, 65536 + 17, 300_001]
                     + rng.integers(2048, 20_000, 40).tolist(), dtype=np.int64)
    offsets = rng.integers(0, source.size - sizes.max(), sizes.size)
    addresses = source.ctypes.data + offsets.astype(np.int64)
    expected = np.array([xxh64(source[o:o + n].tobytes()) for o, n in zip(offsets.tolist(), sizes.tolist())],
                        dtype=np.uint64)
    found = np.zeros(sizes.size, dtype=np.uint64)
    gather._native.digests(found, addresses, sizes)
    assert found.tolist() == expected.tolist()
    for gap in (0, 1, 8, 63):  # the destination ranges start at every alignment
        starts = (np.concatenate(([0], np.cumsum(sizes[:-1] + gap))) + gap).astype(np.int64)
        out = np.full(int(starts[-1] + sizes[-1]), 0xEE, dtype=np.uint8)
        assert gather._native.copy_checked(out, starts, addresses, sizes, expected) == -1
        for start, offset, n in zip(starts.tolist(), offsets.tolist(), sizes.tolist()):
            assert out[start:start + n].tobytes() == source[offset:offset + n].tobytes()
        wrong = expected.copy()
        wrong[9] ^= 1 << 63
        out[:] = 0xEE
        assert gather._native.copy_checked(out, starts, addresses, sizes, wrong) == 9
        assert set(out[int(starts[10]):].tolist()) == {0xEE}


@pytest.fixture(params=["native", "numpy"])
def copy_routine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C copy routine, or (``numpy``) the code that stands in for it where it was not built."""
    if request.param == "numpy":
        monkeypatch.setattr(gather, "_native", None)
        monkeypatch.setattr(row_hash, "_native", None)
    elif gather._native is None:
        pytest.skip("the C copy routine was not built here")


@pytest.mark.usefixtures("copy_routine")
def test_the_gathers_check_every_row_with_or_without_the_c_routine() -> None:
    rows = np.arange(40, dtype=np.int32).reshape(8, 5)
    addresses = rows.ctypes.data + np.arange(8, dtype=np.int64)[::-1] * 20
    digests = np.array([xxh64(rows[i].tobytes()) for i in range(8)][::-1], dtype=np.uint64)
    out = np.zeros((8, 20), dtype=np.uint8)
    gather.gather_rows(out, addresses, rows.ctypes.data, rows.ctypes.data + rows.nbytes, digests)
    assert np.array_equal(out.view(np.int32), rows[::-1])
    digests[5] += np.uint64(1)
    with pytest.raises(row_hash.RowMismatch) as info:
        gather.gather_rows(out, addresses, rows.ctypes.data, rows.ctypes.data + rows.nbytes, digests)
    assert info.value.index == 5 and info.value.actual == xxh64(rows[2].tobytes())
    lengths = np.array([8, 0, 12], dtype=np.int64)  # an empty row is checked too
    starts = rows.ctypes.data + np.array([0, 8, 8], dtype=np.int64)
    packed = np.zeros(20, dtype=np.uint8)
    good = np.array([xxh64(rows.tobytes()[0:8]), xxh64(b""), xxh64(rows.tobytes()[8:20])], dtype=np.uint64)
    gather.pack_ranges(packed, starts, lengths, rows.ctypes.data, rows.ctypes.data + rows.nbytes, good)
    assert packed.tobytes() == rows.tobytes()[:20]
    good[1] += np.uint64(1)
    with pytest.raises(row_hash.RowMismatch) as info:
        gather.pack_ranges(packed, starts, lengths, rows.ctypes.data, rows.ctypes.data + rows.nbytes, good)
    assert info.value.index == 1


@pytest.mark.usefixtures("copy_routine")
def test_stacking_rows_checks_each_with_or_without_the_c_routine() -> None:
    source = np.arange(4000, dtype=np.int64).reshape(8, 500)  # rows of 4,000 bytes: streamed, and hashed as long
    rows = [source[i] for i in (3, 0, 7, 7, 1, 2, 6, 5)]
    digests = np.array([xxh64(row.tobytes()) for row in rows], dtype=np.uint64)
    out = np.zeros((8, 500), dtype=np.int64)
    gather.stack_rows(out, rows, digests)
    assert np.array_equal(out, np.stack(rows))
    gather.stack_rows(out, rows[::-1], None)
    assert np.array_equal(out, np.stack(rows[::-1]))
    digests[4] ^= np.uint64(1)
    out[:] = 0
    with pytest.raises(row_hash.RowMismatch) as info:
        gather.stack_rows(out, rows, digests)
    assert info.value.index == 4 and info.value.actual == xxh64(rows[4].tobytes())
    assert np.array_equal(out[:4], np.stack(rows[:4]))  # the rows before it are copied
    strided = [source[i, ::2] for i in range(8)]  # not contiguous (a transform's view): stacked by numpy, then checked
    halves = np.zeros((8, 250), dtype=np.int64)
    good = np.array([xxh64(row.tobytes()) for row in strided], dtype=np.uint64)
    gather.stack_rows(halves, strided, good)
    assert np.array_equal(halves, np.stack(strided))
    good[6] ^= np.uint64(1)
    with pytest.raises(row_hash.RowMismatch) as info:
        gather.stack_rows(halves, strided, good)
    assert info.value.index == 6


# -- the writer ----------------------------------------------------------------------------------------------------


def every_kind(i: int) -> dict[str, Any]:
    return {"id": i, "score": np.float32(i / 3), "flag": i % 3 == 0, "image": np.full((2, 3), i, np.uint16),
            "tokens": np.arange(i % 4, dtype=np.int32) + i, "blob": bytes([i % 251]) * (i % 5)}


def test_the_writer_records_the_digest_of_every_row_of_every_field(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", batch_rows=7, shard_bytes=1500) as writer:
        for i in range(60):
            writer.write(every_kind(i))
    ds = Dataset(tmp_path / "ds")
    assert len(ds.shards) > 1
    first = 0
    for info in ds.shards:
        assert info.row_xxh3 is not None and list(info.row_xxh3.fields) == ds.schema.names
        data = (tmp_path / "ds" / info.row_xxh3.path).read_bytes()
        table = np.frombuffer(data, dtype="<u8").reshape(len(ds.schema.names), info.rows)
        for row in range(info.rows):
            sample = every_kind(first + row)
            expected = [np.int64(sample["id"]).tobytes(), sample["score"].tobytes(), bytes([sample["flag"]]),
                        sample["image"].tobytes(), sample["tokens"].tobytes(), sample["blob"]]
            assert table[:, row].tolist() == [xxh64(b) for b in expected]
        first += info.rows
    assert verify_dataset(tmp_path / "ds").ok


@pytest.mark.parametrize("odd", [pa.array(["a string"] * 40), pa.array([1, None] * 20)])
def test_a_shard_with_a_field_not_gathered_by_rows_has_none_and_is_checked_whole(tmp_path: Path,
                                                                                 odd: pa.Array) -> None:
    with DatasetWriter(tmp_path / "ds", batch_rows=8) as writer:  # strings; numbers with nulls
        writer.write_batch(pa.record_batch({"id": pa.array(range(40)), "odd": odd}))
    ds = Dataset(tmp_path / "ds")
    assert all(info.row_xxh3 is None for info in ds.shards)
    assert sorted(p.suffix for p in (tmp_path / "ds" / "shards").iterdir()) == [".arrow"]
    flip_bit(tmp_path / "ds" / ds.shards[0].path, ds.shards[0].bytes // 2)
    with pytest.raises(LoaderError, match="none of its samples was delivered"):
        list(Loader(StreamingDataset(tmp_path / "ds", shuffle=False), 4))


# -- the readers ---------------------------------------------------------------------------------------------------

BASE = 7 * 10**11  # ids whose int64 bytes occur once in a shard file
FLIPS = 40  # in the suite; by hand, every bit of every byte of such a shard (15,696 flips): none read wrong


def write_rows(path: Path, rows: int = 200, width: Callable[[int], int] = lambda i: 6) -> Path:
    """Shards of 10-row record batches; row ``r`` has id BASE + r, tokens of ``width(r)`` int32s and an image."""
    with DatasetWriter(path, batch_rows=10, shard_bytes=6000) as writer:
        for r in range(rows):
            writer.write({"id": BASE + r, "tokens": np.full(width(r), BASE % 1000 + r, dtype=np.int32),
                          "image": np.full((2, 2), r, dtype=np.float64), "blob": bytes([r % 256]) * (r % 9 + 1)})
    assert len(Dataset(path).shards) >= 2
    return path


def damage_field(root: Path, row: int, field: str) -> tuple[str, int]:
    """Flip a bit of field ``field`` of global row ``row`` in its shard file; its shard key and shard-local row."""
    ds = Dataset(root)
    shard, local = ds.index.locate(row)
    info = ds.shards[shard]
    value = {"id": np.int64(BASE + row).tobytes(),
             "tokens": np.full(2, BASE % 1000 + row, dtype=np.int32).tobytes(),
             "image": np.full(2, row, dtype=np.float64).tobytes(),
             "blob": bytes([row % 256]) * (row % 9 + 1)}[field]
    data = bytearray((root / info.path).read_bytes())
    position = bytes(data).index(value) if field != "blob" else _blob_at(ds, shard, local)
    data[position] ^= 0x10
    (root / info.path).write_bytes(bytes(data))
    return info.path, local


def _blob_at(ds: Dataset, shard: int, local: int) -> int:
    """Where in its shard file the first byte of shard row ``local``'s blob lies."""
    number = ds.shards[shard].batch_of(local)
    batch = ds.read_batch(shard, number)
    column = batch.column("blob")
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)
    data_buffer = column.buffers()[2]
    mapped = ds.mapped(shard).buffer
    row = local - ds.shards[shard].batches[number].first_row
    return data_buffer.address - mapped.address + int(offsets[column.offset + row])


def same(sample: dict[str, Any]) -> dict[str, Any]:
    """A transform that changes nothing."""
    return sample


def loader_ids(root: Path, **options: Any) -> list[int]:
    found: list[int] = []
    for batch in Loader(StreamingDataset(root, shuffle=options.pop("shuffle", False)), 8, **options):
        found.extend(int(i) for i in (batch["id"] if "id" in batch else [s["id"] for s in batch]))
    return found


@pytest.mark.parametrize(("field", "options", "width"), [
    ("id", {}, None),                                          # a scalar: rows gathered, checked as copied
    ("image", {"shuffle": True}, None),                        # a tensor
    ("tokens", {"lists": "pad"}, None),                        # lists of one length, padded: gathered
    ("tokens", {"lists": "pad"}, lambda i: 2 + i % 5),         # lists of several lengths: checked, then copied
    ("tokens", {"lists": "pack"}, lambda i: 2 + i % 5),        # packed end to end
    ("blob", {}, None),                                        # binary, packed
    ("id", {"workers": 2}, None),                              # workers: checked as stacked into shared memory
    ("image", {"workers": 2, "shuffle": True}, None),
    ("tokens", {"workers": 2}, None),
    ("blob", {"workers": 2}, None),                            # binary: checked in shared memory once packed
    ("image", {"workers": 2, "transform": same}, None),         # checked where it lies, before the transform
])
def test_every_way_the_loader_copies_rows_refuses_a_damaged_row(
    tmp_path: Path, field: str, options: dict[str, Any], width: Callable[[int], int] | None
) -> None:
    root = write_rows(tmp_path / "ds", width=width or (lambda i: 6))
    assert Dataset(root).shards[0].row_xxh3 is not None
    key, local = damage_field(root, 57, field)
    delivered: list[int] = []
    with pytest.raises(LoaderError) as info:
        for batch in Loader(StreamingDataset(root, shuffle=options.pop("shuffle", False)), 8, **options):
            delivered.extend(int(i) for i in (batch["id"] if isinstance(batch, dict) else [s["id"] for s in batch]))
    assert BASE + 57 not in delivered
    if "workers" in options:  # a worker's error comes as its message
        assert f"IntegrityError: {Dataset(root).url}: {key!r}" in str(info.value)
        assert f"row {local} of field {field!r}: xxh3-64" in str(info.value)
        return
    cause = info.value.__cause__
    assert isinstance(cause, IntegrityError) and cause.key == key
    assert f"row {local} of field {field!r}: xxh3-64" in str(cause)
    assert pickle.loads(pickle.dumps(cause)).what == cause.what  # crosses to a DataLoader's main process intact


def test_a_worker_refuses_rows_to_check_that_came_without_their_digests(tmp_path: Path) -> None:
    root = write_rows(tmp_path / "ds")
    ds = StreamingDataset(root, shuffle=False)
    origin, info = ds._shards[0]
    source = transform_worker._Source(*ds._open_reader().batch_and_rows(0, 0), (origin.url, info.path), 0)
    assert source.rows is not None  # its shard is not known good: its rows are to be checked
    fields = tuple(source.rows.fields)
    partial = np.ones((len(fields), 2), dtype=bool)
    partial[1, 1] = False  # one field of the second sample without its digest
    for checked, expected in ((None, None), (partial, np.zeros((len(fields), 2), dtype=np.uint64))):
        with pytest.raises(RuntimeError, match="came without the digests of all their fields"):
            transform_worker._checks([source, source], fields, checked, expected, in_place=False)


@pytest.mark.parametrize("read", ["loader", "samples", "workers", "collate"])
def test_a_damaged_row_digests_file_is_refused_where_it_is_used(tmp_path: Path, read: str) -> None:
    root = write_rows(tmp_path / "ds")
    rows_key = Dataset(root).shards[1].row_xxh3.path  # type: ignore[union-attr]
    flip_bit(root / rows_key, 13)
    readers = {"loader": lambda: loader_ids(root),
               "samples": lambda: [int(s["id"]) for s in StreamingDataset(root, shuffle=False)],
               "workers": lambda: loader_ids(root, workers=1),
               "collate": lambda: loader_ids(root, collate=lambda samples: samples)}
    if read in ("loader", "workers"):  # they check rows against their digests: they read the file, and refuse it
        with pytest.raises(LoaderError, match=rows_key) as info:
            readers[read]()
        cause = info.value.__cause__  # the workers' trainer reads the digests it sends them
        assert isinstance(cause, IntegrityError) and cause.key == rows_key
    else:  # the others check the shards whole: the digests are not read, the samples are right
        assert sorted(readers[read]()) == list(range(BASE, BASE + 200))
    assert [p.path for p in verify_dataset(root).problems] == [rows_key]


def test_a_truncated_or_missing_row_digests_file_is_a_clean_error(tmp_path: Path) -> None:
    root = write_rows(tmp_path / "ds")
    rows_key = Dataset(root).shards[0].row_xxh3.path  # type: ignore[union-attr]
    data = (root / rows_key).read_bytes()
    (root / rows_key).write_bytes(data[:-8])
    with pytest.raises(LoaderError) as info:
        loader_ids(root)
    assert isinstance(info.value.__cause__, FormatError) and "row digests file was truncated" in str(info.value)
    (root / rows_key).unlink()
    with pytest.raises(LoaderError) as info:
        loader_ids(root)
    assert isinstance(info.value.__cause__, NotFound) and info.value.__cause__.key == rows_key
    assert [p.path for p in verify_dataset(root).problems] == [rows_key]


def test_other_readers_check_shards_with_row_digests_whole(tmp_path: Path) -> None:
    root = write_rows(tmp_path / "ds")
    key, _ = damage_field(root, 57, "tokens")
    with pytest.raises(IntegrityError, match="none of its samples was delivered") as info:
        list(StreamingDataset(root, shuffle=False))
    assert info.value.key == key
    with pytest.raises(LoaderError, match="none of its samples was delivered"):
        loader_ids(root, collate=lambda samples: samples)


def test_a_loader_and_per_sample_reads_in_one_process_both_check(tmp_path: Path) -> None:
    root = write_rows(tmp_path / "ds")
    key, local = damage_field(root, 57, "tokens")
    ds = StreamingDataset(root, shuffle=False)
    with pytest.raises(LoaderError):
        list(Loader(ds, 8))
    delivered: list[int] = []  # the checker now leaves rows to readers: samples are checked by record batch
    with pytest.raises(IntegrityError, match=f"row {local} of field 'tokens'") as info:
        for sample in ds:
            delivered.append(int(sample["id"]))
    assert info.value.key == key and BASE + 57 not in delivered


def test_seeded_bit_flips_anywhere_in_a_shard_are_refused_or_change_nothing(tmp_path: Path) -> None:
    root = write_rows(tmp_path / "ds", rows=60, width=lambda i: 1 + i % 4)
    original = {int(s["id"]): s["tokens"].tolist() for s in StreamingDataset(root, shuffle=False)}
    info = Dataset(root).shards[1]
    path = root / info.path
    pristine = path.read_bytes()
    rng = random.Random(19)
    refused = 0
    for position in rng.sample(range(len(pristine)), FLIPS):
        damaged = bytearray(pristine)
        damaged[position] ^= 1 << rng.randrange(8)
        (tmp_path / "next").write_bytes(bytes(damaged))
        (tmp_path / "next").replace(path)  # a new file: the last run's readers may still map the old one
        shard_check.forget_verified()
        for read in (lambda: [(int(s["id"]), s["tokens"].tolist()) for s in StreamingDataset(root, shuffle=False)],
                     lambda: [(int(i), t[:n].tolist()) for b in Loader(StreamingDataset(root, shuffle=False), 8,
                                                                       lists="pad")
                              for i, t, n in zip(b["id"], b["tokens"], b["tokens_lengths"])]):
            try:
                got = read()
            except (IntegrityError, FormatError, LoaderError):
                refused += 1
                continue
            assert dict(got) == original, f"a flip at byte {position} changed what was read"
    assert refused  # most flips land in the rows' bytes


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_without_row_digests_among_shards_with_them_is_checked_whole(tmp_path: Path, workers: int) -> None:
    root = write_rows(tmp_path / "ds")

    def drop_one(document: dict[str, Any]) -> None:
        (root / document["shards"][1].pop("row_xxh3")["path"]).unlink()

    edit_index(root, drop_one)
    assert sorted(loader_ids(root, shuffle=True, workers=workers)) == list(range(BASE, BASE + 200))
    damage_field(root, 160, "image")  # a shard with row digests beside it is still checked: the workers, by rows
    with pytest.raises(LoaderError, match="row .* of field 'image'" if workers else "of field 'image'|none of its"):
        loader_ids(root, shuffle=True, workers=workers)
    info = Dataset(root).shards[1]
    flip_bit(root / info.path, info.bytes // 2)
    with pytest.raises(LoaderError, match="none of its samples was delivered"):
        loader_ids(root, workers=workers)


def test_row_digests_entries_are_validated(tmp_path: Path) -> None:
    root = write_rows(tmp_path / "ds")
    cases: list[tuple[Callable[[dict[str, Any]], object], str]] = [
        (lambda d: d["shards"][0]["row_xxh3"].update(fields=["id"]), r"row_xxh3.fields"),
        (lambda d: d["shards"][0]["row_xxh3"].update(path="../elsewhere.rows"), r"row_xxh3.path"),
        (lambda d: d["shards"][0]["row_xxh3"].update(path=d["shards"][1]["path"]), "more than once"),
        (lambda d: d["shards"][0]["row_xxh3"].update(xxh3_128="zz"), r"row_xxh3.xxh3_128"),
        (lambda d: d["shards"][0].update(row_xxh3=[1]), "must be an object"),
    ]
    pristine = (root / "index.json").read_bytes()
    for edit, message in cases:
        edit_index(root, edit)
        with pytest.raises(FormatError, match=message):
            Dataset(root)
        (root / "index.json").write_bytes(pristine)


def test_without_row_digests_the_same_dataset_reads_the_same(tmp_path: Path) -> None:
    root = write_rows(tmp_path / "ds", width=lambda i: 1 + i % 3)

    def batches() -> list[tuple[list[int], list[int], list[int]]]:
        return [(b["id"].tolist(), b["tokens"].flatten().tolist(), b["blob"].tolist())
                for b in Loader(StreamingDataset(root, shuffle=True, seed=3), 8, lists="pack")]

    with_digests = batches()
    drop_row_digests(root)
    assert batches() == with_digests
