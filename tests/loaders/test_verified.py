"""The record of checked shard files, shared with forked processes: what one process checked, the others trust."""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.loaders import Dataset, DatasetWriter
from trainio.loaders._read import shard_check, verified

pytestmark = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")

_ONE = (1, 2, 3, 4)
_DIGEST = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def _empty_record() -> None:
    verified.forget()


def _remember_in_child(identity: tuple[int, int, int, int], digest: str) -> None:
    verified.remember(identity, digest)


def _known_in_child(identity: tuple[int, int, int, int], digest: str, answer: multiprocessing.Queue[bool]) -> None:
    answer.put(verified.known(identity, digest))


def test_only_the_same_file_and_digest_are_known() -> None:
    assert not verified.known(_ONE, _DIGEST)
    verified.remember(_ONE, _DIGEST)
    assert verified.known(_ONE, _DIGEST)
    assert not verified.known((1, 2, 3, 5), _DIGEST), "a rewritten file (another mtime) is not known"
    assert not verified.known(_ONE, "f" * 32)
    verified.forget()
    assert not verified.known(_ONE, _DIGEST)


def test_a_check_in_a_forked_child_is_known_to_the_parent_and_its_siblings() -> None:
    context = multiprocessing.get_context("fork")
    answer = context.Queue()
    sibling_before = context.Process(target=_known_in_child, args=(_ONE, _DIGEST, answer))
    sibling_before.start()
    sibling_before.join()
    child = context.Process(target=_remember_in_child, args=(_ONE, _DIGEST))
    child.start()
    child.join()
    assert child.exitcode == 0
    assert verified.known(_ONE, _DIGEST)
    sibling = context.Process(target=_known_in_child, args=(_ONE, _DIGEST, answer))
    sibling.start()
    sibling.join()
    assert [answer.get(timeout=10), answer.get(timeout=10)] == [False, True]


def test_a_torn_or_flipped_entry_reads_as_unknown() -> None:
    verified.remember(_ONE, _DIGEST)
    verified._local.clear()  # as another process sees it: through the shared table only
    table = verified._table
    at = next(i for i in range(0, len(table), verified._SLOT_BYTES) if any(table[i:i + verified._SLOT_BYTES]))
    for offset in (0, 8 * 4, verified._ENTRY_BYTES - 1):  # the identity, the digest, the entry's checksum
        table[at + offset] ^= 0x10
        assert not verified.known(_ONE, _DIGEST)
        table[at + offset] ^= 0x10
        assert verified.known(_ONE, _DIGEST)
        verified._local.clear()


def test_a_full_neighbourhood_still_records_the_newest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verified, "_SLOTS", 4)  # every entry competes for the same four slots
    for i in range(40):
        verified.remember((i, 0, 0, 0), _DIGEST)
    verified._local.clear()
    assert verified.known((39, 0, 0, 0), _DIGEST)
    assert sum(verified.known((i, 0, 0, 0), _DIGEST) for i in range(40)) <= 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the record is anonymous shared memory")
def test_the_record_is_shared_memory() -> None:
    assert not isinstance(verified._table, bytearray)


def _hashes_in_child(dataset: Dataset, go: Any, answer: multiprocessing.Queue[int]) -> None:
    hashed = []
    real = shard_check.Hasher
    shard_check.Hasher = lambda: (hashed.append(1), real())[-1]  # type: ignore[misc]  # one per shard hashed
    go.wait(30)
    for shard in range(len(dataset.shards)):
        dataset.checker().wait(shard)
    answer.put(len(hashed))


def test_a_worker_forked_before_the_trainer_checked_the_shards_does_not_hash_them_again(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", shard_bytes=4096, batch_rows=16) as writer:
        writer.write_batch({"x": np.arange(2000, dtype=np.int64)})
    dataset = Dataset(tmp_path / "ds")
    assert len(dataset.shards) >= 3
    shard_check.forget_verified()
    context = multiprocessing.get_context("fork")
    go, answer = context.Event(), context.Queue()
    worker = context.Process(target=_hashes_in_child, args=(dataset, go, answer))
    worker.start()  # forked before anything is checked: it inherits no record of its own
    try:
        for shard in range(len(dataset.shards)):
            dataset.checker().wait(shard)  # the trainer's checker: hashes each once
        go.set()
        assert answer.get(timeout=60) == 0
    finally:
        worker.join(30)
    assert worker.exitcode == 0


def _claim_then(identity: tuple[int, int, int, int], digest: str, seconds: float, good: bool, ready: Any) -> None:
    verified.claim(identity, digest)
    ready.set()
    time.sleep(seconds)
    if good:
        verified.remember(identity, digest)
    verified.release(identity, digest)


def test_a_file_another_live_process_is_hashing_is_waited_for_not_hashed_again(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with DatasetWriter(tmp_path / "ds", shard_bytes=4096, batch_rows=16) as writer:
        writer.write_batch({"x": np.arange(500, dtype=np.int64)})
    dataset = Dataset(tmp_path / "ds")
    mapped, digest = dataset.mapped(0), dataset.shards[0].xxh3_128
    context = multiprocessing.get_context("fork")
    hashed: list[int] = []
    real = shard_check.Hasher
    monkeypatch.setattr(shard_check, "Hasher", lambda: (hashed.append(1), real())[-1])
    for good in (True, False):
        shard_check.forget_verified()
        ready = context.Event()
        other = context.Process(target=_claim_then, args=(mapped.identity, digest, 0.5, good, ready))
        other.start()
        assert ready.wait(30)
        assert verified.hashing(mapped.identity, digest)
        started = time.monotonic()
        fresh = dataset if good else Dataset(tmp_path / "ds")  # a checker lives as long as its dataset
        fresh.checker().wait(0)
        assert time.monotonic() - started >= 0.3, "it waited for the other process's result"
        assert hashed == ([] if good else [1]), "a result found good is taken; otherwise the file is hashed here"
        other.join(30)
        assert not verified.hashing(mapped.identity, digest)


def test_a_claim_left_by_a_dead_process_is_not_waited_for() -> None:
    context = multiprocessing.get_context("fork")
    dead = context.Process(target=verified.claim, args=(_ONE, _DIGEST))
    dead.start()
    dead.join(30)
    assert not verified.hashing(_ONE, _DIGEST), "its pid is gone"
    verified.claim(_ONE, _DIGEST)
    assert not verified.hashing(_ONE, _DIGEST), "this process's own claim is not another's"
    verified.release(_ONE, _DIGEST)
