"""The staging ring: a slot is lent again only once its arrays are gone, and the slot freed last goes first."""

from __future__ import annotations

import numpy as np

from trainio.loaders._batch.staging import Staging, StagingRing


def _carve(ring: StagingRing, value: int) -> tuple[Staging, np.ndarray]:
    slot = ring.take()
    slot.reset()
    array = slot.array((1000,), np.dtype(np.int32))
    array.fill(value)
    ring.free_when_released(slot)
    return slot, array


def test_a_slot_is_not_lent_while_an_array_of_its_group_lives() -> None:
    ring = StagingRing(lambda nbytes: np.empty(nbytes, dtype=np.uint8))
    first, held = _carve(ring, 1)
    view = held[10:20]
    del held
    second, other = _carve(ring, 2)
    assert second is not first
    assert (view == 1).all() and (other == 2).all()
    del view
    assert ring.take() is first


def test_the_slot_freed_last_is_lent_first() -> None:
    ring = StagingRing(lambda nbytes: np.empty(nbytes, dtype=np.uint8))
    ring.reserve(3)
    slots, arrays = zip(*(_carve(ring, value) for value in range(3)))
    assert len({id(slot) for slot in slots}) == 3
    held = list(arrays)
    del arrays
    for _ in range(3):  # freed in the order 0, 1, 2
        held.pop(0)
    assert ring.take() is slots[2]
    assert ring.take() is slots[1]
    assert ring.take() is slots[0]


def test_every_staged_array_starts_on_a_cache_line() -> None:
    from trainio.loaders._batch.device import staging_allocator

    allocate = staging_allocator(None, None)
    for nbytes in (1, 4096, 3 << 20, 64 << 20):
        assert allocate(nbytes).ctypes.data % 64 == 0 and allocate(nbytes).nbytes == nbytes
    slot = Staging(allocate)
    slot.reset()
    arrays = [slot.array((n,), np.dtype(np.uint8)) for n in (5, 8192, 3, 100_000)]
    assert [a.ctypes.data % 64 for a in arrays] == [0, 0, 0, 0]


def test_a_slot_allocates_once_for_a_group_of_one_big_array_and_small_ones_and_again_never() -> None:
    sizes: list[int] = []
    slot = Staging(lambda nbytes: (sizes.append(nbytes), np.empty(nbytes, dtype=np.uint8))[1])
    for _ in range(3):  # a group as a Loader stages one: a field's rows, then their lengths
        slot.reset()
        slot.array((64, 4096), np.dtype(np.int32))
        slot.array((64,), np.dtype(np.int64))
        slot.leases()
    assert len(sizes) == 1 and sizes[0] >= 64 * 4096 * 4 + 64 * 8  # the first group's memory is touched once
