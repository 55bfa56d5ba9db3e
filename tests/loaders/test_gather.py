"""Row gathers and range copies: exact bytes, and refusal of anything outside the memory they were given."""

from __future__ import annotations

import ctypes
import errno

import numpy as np
import pyarrow as pa
import pytest

import trainio.loaders._gather as gather
from trainio.loaders._columns import Columns
from trainio.storage import FormatError


@pytest.mark.parametrize("with_torch", [True, False])
def test_rows_are_gathered_from_anywhere_in_the_span(with_torch: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not with_torch:
        monkeypatch.setattr(gather, "torch", None)
    source = np.random.default_rng(0).integers(0, 256, size=10_000, dtype=np.uint8)
    base = source.ctypes.data
    starts = np.array([0, 9_990, 17, 5_000, 17], dtype=np.int64)
    out = np.empty((5, 10), dtype=np.uint8)
    gather.gather_rows(out, base + starts, base, base + source.size)
    for row, start in zip(out, starts.tolist()):
        assert np.array_equal(row, source[start:start + 10])


def test_a_row_past_the_span_is_refused() -> None:
    source = np.zeros(100, dtype=np.uint8)
    base = source.ctypes.data
    with pytest.raises(ValueError, match="outside"):
        gather.gather_rows(np.empty((1, 10), np.uint8), np.array([base + 95]), base, base + 100)


@pytest.mark.parametrize("path", ["system call", "memmove", "system call refused"])
def test_ranges_are_copied_and_adjacent_ones_merged(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "memmove":
        monkeypatch.setattr(gather, "_vector", None)
    elif path == "system call refused":
        def refused(*args: object) -> int:
            ctypes.set_errno(errno.EPERM)
            return -1

        monkeypatch.setattr(gather, "_vector", refused)
    source = np.arange(50, dtype=np.uint8)
    base = source.ctypes.data
    out = np.zeros(20, dtype=np.uint8)
    addresses = base + np.array([10, 13, 40], dtype=np.int64)
    gather.copy_ranges(out, np.array([0, 3, 10]), addresses, np.array([3, 4, 5]))
    assert out[:7].tolist() == list(range(10, 17)) and out[10:15].tolist() == list(range(40, 45))
    assert not out[7:10].any() and not out[15:].any()
    with pytest.raises(ValueError, match="outside the destination"):
        gather.copy_ranges(out, np.array([18]), addresses[:1], np.array([5]))
    if path == "system call refused":
        assert gather._vector is None, "a refused system call is not tried again"


def test_long_ranges_are_copied_one_memmove_each(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_for_long_ranges(*args: object) -> int:
        raise AssertionError("process_vm_readv used for ranges longer than _VECTOR_BELOW")

    monkeypatch.setattr(gather, "_vector", not_for_long_ranges)
    length = gather._VECTOR_BELOW + 1
    source = np.random.default_rng(1).integers(0, 256, size=4 * length, dtype=np.uint8)
    base = source.ctypes.data
    out = np.zeros(2 * length, dtype=np.uint8)
    gather.copy_ranges(out, np.array([0, length]), base + np.array([3 * length, 0]), np.array([length, length]))
    assert np.array_equal(out[:length], source[3 * length:]) and np.array_equal(out[length:], source[:length])


def _expected(source: np.ndarray, starts: list[int], lengths: list[int]) -> np.ndarray:
    return np.concatenate([source[start:start + length] for start, length in zip(starts, lengths)])


@pytest.mark.parametrize("with_torch", [True, False])
def test_ranges_are_packed_end_to_end_in_their_order(with_torch: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not with_torch:
        monkeypatch.setattr(gather, "torch", None)
    long = gather._VECTOR_BELOW + 3
    source = np.random.default_rng(2).integers(0, 256, size=20 * long, dtype=np.uint8)
    base = source.ctypes.data
    # out of order, adjacent (merged), empty, and touching both ends of the span
    starts = [19 * long - 5, 0, 7 * long, 8 * long, 3 * long, 5 * long + 1]
    lengths = [long + 5, long, long, long, 0, long - 1]
    out = np.zeros(sum(lengths), dtype=np.uint8)
    gather.pack_ranges(out, base + np.array(starts), np.array(lengths), base, base + source.size)
    assert np.array_equal(out, _expected(source, starts, lengths))


def test_long_ranges_are_packed_by_one_call_and_overlapping_ones_still_exactly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    copies: list[int] = []
    monkeypatch.setattr(gather, "_copy_runs", lambda out, starts, *args: copies.append(len(starts)))
    long = gather._VECTOR_BELOW * 2
    source = np.random.default_rng(3).integers(0, 256, size=10 * long, dtype=np.uint8)
    base = source.ctypes.data
    starts, lengths = [6 * long, 2 * long, 4 * long], [long, long, long]
    out = np.zeros(3 * long, dtype=np.uint8)
    gather.pack_ranges(out, base + np.array(starts), np.array(lengths), base, base + source.size)
    assert copies == [] and np.array_equal(out, _expected(source, starts, lengths))
    monkeypatch.undo()
    starts = [2 * long, 2 * long, 2 * long + 5]  # the same sample twice, and one overlapping it
    gather.pack_ranges(out, base + np.array(starts), np.array(lengths), base, base + source.size)
    assert np.array_equal(out, _expected(source, starts, lengths))


def test_packing_refuses_a_wrong_destination_or_a_range_outside_its_memory() -> None:
    source = np.zeros(100, dtype=np.uint8)
    base = source.ctypes.data
    with pytest.raises(ValueError, match="room for 10 bytes"):
        gather.pack_ranges(np.empty(9, np.uint8), np.array([base]), np.array([10]), base, base + 100)
    with pytest.raises(ValueError, match="outside"):
        gather.pack_ranges(np.empty(10, np.uint8), np.array([base + 95]), np.array([10]), base, base + 100)


def test_list_offsets_outside_their_values_are_a_format_error() -> None:
    values = pa.array(np.arange(4, dtype=np.int32))
    offsets = pa.array(np.array([0, 3, 1, 4], dtype=np.int32))  # row 1 would be -2 long: only full validation sees it
    broken = pa.ListArray.from_buffers(pa.list_(pa.int32()), 3, [None, offsets.buffers()[1]], children=[values])
    batch = pa.record_batch([broken], names=["tokens"])
    with pytest.raises(FormatError, match="'tokens'.*outside") as info:
        Columns.of(batch, source=("file:///ds", "shards/shard-00000.arrow"))
    assert "shard-00000.arrow" in str(info.value)
