"""What readers refuse: a damaged index (every bit flip), damaged shards, and hostile files (FIFOs, deep JSON, links out)."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.loaders import Dataset, DatasetIndex, DatasetWriter, Loader, LoaderError, StreamingDataset, verify_dataset
from trainio.loaders._read import verified
from trainio.storage import SEAL_FIELD, FormatError, IntegrityError, NotFound, StoreError, seal_json

from ._damage import drop_row_digests, edit_index, flip_bit

pytestmark = pytest.mark.timeout(120)  # a FIFO or a deep document must never hang a read


def write_dataset(path: Path, rows: int = 40, batch_rows: int = 10, shard_bytes: int = 1 << 20) -> Path:
    with DatasetWriter(path, batch_rows=batch_rows, shard_bytes=shard_bytes) as writer:
        writer.write_batch({"id": np.arange(rows, dtype=np.int64),
                            "tokens": [np.arange(i % 5, dtype=np.int32) for i in range(rows)]})
    return path


def finishes(call: Callable[[], Any]) -> Exception | None:
    """What ``call`` raised (None if nothing); a hang fails the test through its timeout mark, not a clock here."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - handed to the test
        return exc
    return None


# -- index.json: the seal --------------------------------------------------------------------------------------


def test_the_writer_seals_the_index_as_version_2(tmp_path: Path) -> None:
    data = (write_dataset(tmp_path / "ds") / "index.json").read_bytes()
    assert b'"version": 2' in data and data.rstrip().endswith(b"}")
    assert f'"{SEAL_FIELD}": "'.encode() in data[-60:]
    assert Dataset(tmp_path / "ds").index == DatasetIndex.from_json(data, url="u")


def test_every_bit_flip_of_a_small_index_is_refused_or_harmless(tmp_path: Path) -> None:
    data = (write_dataset(tmp_path / "ds", rows=12, batch_rows=4) / "index.json").read_bytes()
    good = DatasetIndex.from_json(data, url="u")
    refused = same = 0
    for position in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            try:
                parsed = DatasetIndex.from_json(bytes(damaged), url="u")
            except FormatError:
                refused += 1
                continue
            assert parsed == good, (position, bit)
            same += 1
    assert refused + same == 8 * len(data)
    assert same == 0  # the seal covers every byte, its own digits included


def test_a_seeded_sample_of_index_bit_flips_end_to_end(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", rows=12, batch_rows=4)
    data = (root / "index.json").read_bytes()
    rng = random.Random(19)
    for position, bit in [(rng.randrange(len(data)), rng.randrange(8)) for _ in range(24)]:
        flip_bit(root / "index.json", position, bit)
        with pytest.raises(FormatError) as info:
            StreamingDataset(root)
        assert info.value.key == "index.json"
        report = verify_dataset(root)
        assert not report.ok and report.problems[0].path == "index.json"
        (root / "index.json").write_bytes(data)
    assert sorted(int(s["id"]) for s in StreamingDataset(root)) == list(range(12))


def test_an_unsealed_version_2_index_is_refused(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds")
    edit_index(root, lambda d: None, seal=False)
    with pytest.raises(FormatError, match=f"must end with its '{SEAL_FIELD}' member"):
        Dataset(root)


def test_a_version_1_index_without_a_seal_is_still_read(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds")
    edit_index(root, lambda d: d.update(version=1), seal=False)
    assert len(Dataset(root)) == 40
    edit_index(root, lambda d: d.update(version=1))  # a seal on a version-1 index is checked too
    assert len(Dataset(root)) == 40
    flip_bit(root / "index.json", 30)
    with pytest.raises(FormatError, match="damaged"):
        Dataset(root)


def test_a_seal_member_that_is_not_a_seal_is_refused(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds")
    edit_index(root, lambda d: d.update(version=1, **{SEAL_FIELD: "not a digest"}), seal=False)
    with pytest.raises(FormatError, match=SEAL_FIELD):
        Dataset(root)


# -- index.json: hostile documents ------------------------------------------------------------------------------


def test_a_deeply_nested_index_is_a_clean_format_error(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds")
    for depth in (300, 5000, 100_000):
        nested = b"[" * depth + b"]" * depth
        (root / "index.json").write_bytes(b'{"format": "trainio.dataset", "version": 1, "x": ' + nested + b"}")
        with pytest.raises(FormatError, match="nested more than") as info:
            Dataset(root)
        assert info.value.key == "index.json"
        assert "nested more than" in verify_dataset(root).problems[0].reason
        # sealed, the depth is still bounded
        (root / "index.json").write_bytes(seal_json({"format": "trainio.dataset", "x": []}, indent=None)
                                          .replace(b'"x":[]', b'"x":' + nested))
        with pytest.raises(FormatError):
            Dataset(root)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_in_place_of_the_index_is_refused_without_hanging(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds")
    (root / "index.json").unlink()
    os.mkfifo(root / "index.json")
    error = finishes(lambda: Dataset(root))
    assert isinstance(error, NotFound) and error.key == "index.json" and "not a regular file" in str(error)
    assert finishes(lambda: verify_dataset(root)) is None
    problems = verify_dataset(root).problems
    assert problems[0].path == "index.json" and "not a regular file" in problems[0].reason


def test_an_index_symlinked_from_outside_the_dataset_is_refused(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds")
    outside = tmp_path / "elsewhere.json"
    (root / "index.json").rename(outside)
    (root / "index.json").symlink_to(outside)
    with pytest.raises(StoreError, match="symbolic link leads it out") as info:
        Dataset(root)
    assert info.value.key == "index.json"


# -- shards: checked before any sample of them is delivered ------------------------------------------------------

BASE = 10**12  # ids whose int64 bytes occur once in a shard file


def write_shards(path: Path, checked_by: str = "rows", rows: int = 256) -> Path:
    """A dataset of several shards of a few 16-row record batches each; row ``r``'s id is BASE + r. Its rows are
    checked one by one against their digests (``checked_by="rows"``, as trainio writes it), or its shards whole
    (``"shard"``: no row digests)."""
    ids = BASE + np.arange(rows, dtype=np.int64)
    with DatasetWriter(path, batch_rows=16, shard_bytes=2000) as writer:
        writer.write_batch({"id": ids, "tokens": [np.full(3, i % 100, dtype=np.int32) for i in ids]})
    assert len(Dataset(path).shards) >= 4 and len(Dataset(path).shards[1].batches) >= 2
    return drop_row_digests(path) if checked_by == "shard" else path


def damage_value(root: Path, row: int) -> tuple[str, set[int]]:
    """Flip one bit of row ``row``'s id inside its shard file; the shard's key and the ids it holds."""
    ds = Dataset(root)
    shard, _ = ds.index.locate(row)
    info = ds.shards[shard]
    path = root / info.path
    data = bytearray(path.read_bytes())
    position = bytes(data).index(np.int64(BASE + row).tobytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    first = ds.index.shard_offsets[shard]
    return info.path, set(range(BASE + first, BASE + first + info.rows))


def withheld(checked_by: str, damaged: set[int]) -> set[int]:
    """What a Loader must never deliver once row ``BASE + 100`` is damaged: its whole shard where shards are
    checked whole, the row where each row is checked."""
    return damaged if checked_by == "shard" else {BASE + 100}


def the_refusal(checked_by: str, root: Path) -> str:
    """How the error says what was not delivered: the shard, or row ``BASE + 100`` (its number in its shard)."""
    if checked_by == "shard":
        return "none of its samples was delivered"
    return f"row {Dataset(root).index.locate(100)[1]} of field 'id'"


CHECKED_BY = pytest.mark.parametrize("checked_by", ["shard", "rows"])


@CHECKED_BY
@pytest.mark.parametrize("shuffle", [False, True])
def test_a_flipped_bit_in_a_local_shard_stops_streaming_before_any_of_its_samples(
    tmp_path: Path, shuffle: bool, checked_by: str
) -> None:
    root = write_shards(tmp_path / "ds", checked_by)  # samples are checked by whole shards, row digests or not
    key, damaged = damage_value(root, 100)
    delivered: list[int] = []
    with pytest.raises(IntegrityError) as info:
        for sample in StreamingDataset(root, shuffle=shuffle, shuffle_window=64):
            delivered.append(int(sample["id"]))
    assert info.value.key == key and the_refusal("shard", root) in str(info.value)
    assert delivered and not damaged & set(delivered)  # the shards before it were read, none of it


@CHECKED_BY
@pytest.mark.parametrize("shuffle", [False, True])
def test_a_flipped_bit_in_a_local_shard_stops_the_loader_before_the_damaged_samples(
    tmp_path: Path, shuffle: bool, checked_by: str
) -> None:
    root = write_shards(tmp_path / "ds", checked_by)
    key, damaged = damage_value(root, 100)
    delivered: list[int] = []
    with pytest.raises(LoaderError) as info:
        for batch in Loader(StreamingDataset(root, shuffle=shuffle, shuffle_window=64), 8):
            delivered.extend(int(i) for i in batch["id"])
    cause = info.value.__cause__
    assert isinstance(cause, IntegrityError) and cause.key == key and the_refusal(checked_by, root) in str(cause)
    assert not withheld(checked_by, damaged) & set(delivered)


@CHECKED_BY
def test_transform_workers_refuse_a_damaged_row_without_waiting_for_its_whole_shard(tmp_path: Path,
                                                                                     checked_by: str) -> None:
    root = write_shards(tmp_path / "ds", checked_by)
    key, damaged = damage_value(root, 100)
    delivered: list[int] = []
    loader = Loader(StreamingDataset(root, shuffle=False), 4, workers=2)  # row 100 is not its shard's first 4
    try:
        with pytest.raises(LoaderError, match=f"IntegrityError.*{key}") as info:
            for batch in loader:
                delivered.extend(int(i) for i in batch["id"])
    finally:
        loader.close()
    assert the_refusal(checked_by, root) in str(info.value)
    assert not withheld(checked_by, damaged) & set(delivered)
    if checked_by == "rows":  # each row checked as a worker uses it: the damaged shard's rows before it came
        assert damaged & set(delivered)


def test_transform_workers_check_every_row_they_use(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "ds")
    ds = StreamingDataset(root, shuffle=True, shuffle_window=64)
    loader = Loader(ds, 8, workers=2)
    try:
        ids = sorted(int(i) for batch in loader for i in batch["id"])
    finally:
        loader.close()
    assert ids == list(range(BASE, BASE + 256))
    dataset = ds.dataset  # no shard was hashed whole: in memory, they were left to the workers' row checks
    assert not any(verified.known(dataset.mapped(s).identity, info.xxh3_128) for s, info in enumerate(dataset.shards))


def test_a_damaged_shard_is_refused_inside_dataloader_workers(tmp_path: Path) -> None:
    torch_data = pytest.importorskip("torch.utils.data")
    root = write_shards(tmp_path / "ds")
    key, damaged = damage_value(root, 100)
    loader = torch_data.DataLoader(StreamingDataset(root, batch_size=8, shuffle=False), batch_size=8, num_workers=2)
    delivered: list[int] = []
    # torch re-raises a worker's error as its type built from the message, or as a RuntimeError naming it
    with pytest.raises((IntegrityError, RuntimeError), match=f"IntegrityError.*{key}.*none of its samples"):
        for batch in loader:
            delivered.extend(int(i) for i in batch["id"])
    assert not damaged & set(delivered)


def test_a_shard_checked_once_is_not_hashed_again_until_its_file_changes(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "ds")
    ds = StreamingDataset(root, shuffle=False)
    assert len(list(ds)) == 256
    key, _ = damage_value(root, 100)  # rewritten: another inode and mtime, so it is hashed again
    with pytest.raises(IntegrityError, match=key):
        list(ds)


# -- shards: hostile files -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_in_place_of_a_shard_is_a_clean_error_everywhere(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "ds")
    key = Dataset(root).shards[1].path
    (root / key).unlink()
    os.mkfifo(root / key)
    row = Dataset(root).index.shard_offsets[1]
    for read in (lambda: Dataset(root)[row], lambda: list(StreamingDataset(root, shuffle=False)),
                 lambda: list(Loader(StreamingDataset(root, shuffle=False), 8)), lambda: Dataset(root).read_shard(1)):
        error = finishes(read)
        assert isinstance(error, (NotFound, LoaderError)), error
        found = error.__cause__ if isinstance(error, LoaderError) else error
        assert isinstance(found, NotFound) and found.key == key and "not a regular file" in str(found)
    problems = finishes_with(lambda: verify_dataset(root)).problems
    assert [p.path for p in problems] == [key] and "not a regular file" in problems[0].reason


def finishes_with(call: Callable[[], Any]) -> Any:
    """``call()``'s value, failing the test if it hangs."""
    values: list[Any] = []
    assert finishes(lambda: values.append(call())) is None
    return values[0]


@pytest.mark.parametrize("link", ["directory", "file"])
def test_shards_linked_from_outside_the_dataset_are_never_read(tmp_path: Path, link: str) -> None:
    root = write_shards(tmp_path / "ds")
    elsewhere = tmp_path / "elsewhere"
    key = Dataset(root).shards[1].path
    if link == "directory":
        (root / "shards").rename(elsewhere)
        (root / "shards").symlink_to(elsewhere, target_is_directory=True)
    else:
        elsewhere.mkdir()
        (root / key).rename(elsewhere / "shard.arrow")
        (root / key).symlink_to(elsewhere / "shard.arrow")
    row = Dataset(root).index.shard_offsets[1]
    for read in (lambda: Dataset(root)[row], lambda: list(StreamingDataset(root, shuffle=False)),
                 lambda: Dataset(root).read_shard(1)):
        with pytest.raises(StoreError, match="symbolic link leads it out") as info:
            read()
        assert info.value.key in {k for shard in Dataset(root).shards[:2] for k in shard.files}
    with pytest.raises(LoaderError) as caught:
        list(Loader(StreamingDataset(root, shuffle=False), 8))
    assert isinstance(caught.value.__cause__, StoreError)
    problems = verify_dataset(root).problems
    assert key in [p.path for p in problems] and "symbolic link" in problems[0].reason


def test_a_link_inside_the_dataset_is_followed(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "ds")
    key = Dataset(root).shards[1].path
    (root / key).rename(root / "shards" / "moved.arrow")
    (root / key).symlink_to("moved.arrow")
    assert sorted(int(s["id"]) for s in StreamingDataset(root)) == list(range(BASE, BASE + 256))


def test_the_check_starts_when_the_dataset_is_made_and_a_waiting_reader_helps(tmp_path: Path) -> None:
    from trainio.loaders._read import shard_check as _shard_check

    root = write_shards(tmp_path / "ds", "shard")
    _shard_check.forget_verified()
    ds = StreamingDataset(root)  # announces the first epoch's shards: checked before anything iterates
    dataset = ds.dataset
    deadline = 200
    while deadline and not all(verified.known(dataset.mapped(s).identity, dataset.shards[s].xxh3_128)
                               for s in range(len(dataset.shards))):
        threading.Event().wait(0.05)
        deadline -= 1
    assert deadline, "the shards were not checked in the background"
    _shard_check.forget_verified()
    fresh = Dataset(root)
    checker = fresh.checker()
    assert checker.wait(2).buffer.size == fresh.shards[2].bytes  # no thread was asked: the waiter hashed it
    assert verified.known(fresh.mapped(2).identity, fresh.shards[2].xxh3_128)
