"""Row gathers and range copies: exact bytes, and refusal of anything outside the memory they were given."""

from __future__ import annotations

import ctypes
import errno

import numpy as np
import pyarrow as pa
import pytest

import trainio.loaders._batch.gather as gather
from trainio.loaders._format.columns import Columns
from trainio.storage import FormatError

NOT_BUILT = "trainio.loaders._batch._copy was not built (no C compiler at install)"


def use(copier: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copy with trainio's C routine ("native"), or without it, with torch or with numpy alone."""
    if copier == "native":
        if gather._native is None:
            pytest.skip(NOT_BUILT)
        return
    monkeypatch.setattr(gather, "_native", None)
    if copier == "numpy":
        monkeypatch.setattr(gather, "torch", None)


@pytest.mark.parametrize("copier", ["native", "torch", "numpy"])
def test_rows_are_gathered_from_anywhere_in_the_span(copier: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use(copier, monkeypatch)
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


@pytest.mark.parametrize("path", ["native", "system call", "memmove", "system call refused"])
def test_ranges_are_copied_and_adjacent_ones_merged(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use("native" if path == "native" else "torch", monkeypatch)
    copied: list[int] = []
    if path == "native":
        real = gather._native.copy

        def recorded(destination: np.ndarray, starts: np.ndarray, *args: np.ndarray) -> None:
            copied.append(len(starts))
            real(destination, starts, *args)

        monkeypatch.setattr(gather, "_native", type("Native", (), {"copy": staticmethod(recorded)}))
    elif path == "memmove":
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
    if path == "native":
        assert copied == [2], "the first two ranges are adjacent: one range"


def test_long_ranges_are_copied_one_memmove_each(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_for_long_ranges(*args: object) -> int:
        raise AssertionError("process_vm_readv used for ranges longer than _VECTOR_BELOW")

    monkeypatch.setattr(gather, "_vector", not_for_long_ranges)
    monkeypatch.setattr(gather, "_native", None)
    length = gather._VECTOR_BELOW + 1
    source = np.random.default_rng(1).integers(0, 256, size=4 * length, dtype=np.uint8)
    base = source.ctypes.data
    out = np.zeros(2 * length, dtype=np.uint8)
    gather.copy_ranges(out, np.array([0, length]), base + np.array([3 * length, 0]), np.array([length, length]))
    assert np.array_equal(out[:length], source[3 * length:]) and np.array_equal(out[length:], source[:length])


def _expected(source: np.ndarray, starts: list[int], lengths: list[int]) -> np.ndarray:
    return np.concatenate([source[start:start + length] for start, length in zip(starts, lengths)])


@pytest.mark.parametrize("copier", ["native", "torch", "numpy"])
def test_ranges_are_packed_end_to_end_in_their_order(copier: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use(copier, monkeypatch)
    long = gather._VECTOR_BELOW + 3
    source = np.random.default_rng(2).integers(0, 256, size=20 * long, dtype=np.uint8)
    base = source.ctypes.data
    # out of order, adjacent (merged), empty, and touching both ends of the span
    starts = [19 * long - 5, 0, 7 * long, 8 * long, 3 * long, 5 * long + 1]
    lengths = [long + 5, long, long, long, 0, long - 1]
    out = np.zeros(sum(lengths), dtype=np.uint8)
    gather.pack_ranges(out, base + np.array(starts), np.array(lengths), base, base + source.size)
    assert np.array_equal(out, _expected(source, starts, lengths))


def test_without_the_c_routine_long_ranges_are_packed_by_one_torch_call_and_overlapping_ones_still_exactly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    use("torch", monkeypatch)
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
    use("torch", monkeypatch)
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


@pytest.mark.skipif(gather._native is None, reason=NOT_BUILT)
def test_the_c_routine_copies_exactly_at_any_alignment_and_length() -> None:
    # lengths about the point where streaming stores take over, destinations off every alignment
    source = np.random.default_rng(4).integers(0, 256, size=100_000, dtype=np.uint8)
    for size in (0, 1, 63, 2047, 2048, 2049, 4096 + 13, 70_001):
        for offset in (0, 1, 17, 63, 64):
            out = np.zeros(size + 200, dtype=np.uint8)
            gather._native.copy(out, np.array([offset]), np.array([source.ctypes.data + 5]), np.array([size]))
            assert np.array_equal(out[offset:offset + size], source[5:5 + size]), (size, offset)
            assert not out[:offset].any() and not out[offset + size:].any(), (size, offset)


@pytest.mark.skipif(gather._native is None, reason=NOT_BUILT)
def test_the_c_routine_copies_many_ranges_each_to_its_place() -> None:
    rng = np.random.default_rng(5)
    source = rng.integers(0, 256, size=300_000, dtype=np.uint8)
    sizes = rng.integers(0, 20_000, size=40)
    sizes[[3, 17]] = 0
    starts = np.concatenate(([0], np.cumsum(sizes + rng.integers(0, 100, size=40))[:-1]))
    offsets = rng.integers(0, source.size - sizes)
    out = np.zeros(int(starts[-1] + sizes[-1]), dtype=np.uint8)
    gather._native.copy(out, starts, source.ctypes.data + offsets, sizes)
    expected = np.zeros_like(out)
    for start, offset, size in zip(starts.tolist(), offsets.tolist(), sizes.tolist()):
        expected[start:start + size] = source[offset:offset + size]
    assert np.array_equal(out, expected)


@pytest.mark.skipif(gather._native is None, reason=NOT_BUILT)
def test_the_c_routine_refuses_bad_arguments_and_then_copies_nothing() -> None:
    source = np.arange(1, 101, dtype=np.uint8)
    address = np.array([source.ctypes.data, source.ctypes.data + 50])
    out = np.zeros(60, dtype=np.uint8)
    cases = [
        ((np.array([0, 58]), address, np.array([10, 3])), ValueError, "range 1 .*outside the 60-byte destination"),
        ((np.array([0, 10]), address, np.array([10, -1])), ValueError, "range 1 .*outside"),
        ((np.array([0, 10], dtype=np.int32), address, np.array([10, 3])), ValueError, "starts must be .*64-bit"),
        ((np.array([0]), address, np.array([10])), ValueError, "sources has 2 items, starts 1"),
        ((np.array([[0, 10]]), address, np.array([10, 3])), ValueError, "starts must be a 1-D"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            gather._native.copy(out, *args)
        assert not out.any(), "nothing is copied before every range is checked"
    with pytest.raises(TypeError):
        gather._native.copy(bytes(60), np.array([0]), address[:1], np.array([10]))


def test_list_offsets_outside_their_values_are_a_format_error() -> None:
    values = pa.array(np.arange(4, dtype=np.int32))
    offsets = pa.array(np.array([0, 3, 1, 4], dtype=np.int32))  # row 1 would be -2 long: only full validation sees it
    broken = pa.ListArray.from_buffers(pa.list_(pa.int32()), 3, [None, offsets.buffers()[1]], children=[values])
    batch = pa.record_batch([broken], names=["tokens"])
    with pytest.raises(FormatError, match="'tokens'.*outside") as info:
        Columns.of(batch, source=("file:///ds", "shards/shard-00000.arrow"))
    assert "shard-00000.arrow" in str(info.value)
