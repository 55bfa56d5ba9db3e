"""Sealed documents and hostile local files: every flip caught, nothing hangs, nothing leaves the root."""

from __future__ import annotations

import json
import os

import pytest

from trainio.storage import (
    SEAL_FIELD,
    FormatError,
    LocalStore,
    NotFound,
    StoreError,
    is_sealed,
    load_sealed,
    parse_json,
    seal_json,
)

from .._bit_flips import bit_flips

DOCUMENT = {"format": "x", "step": 7, "lr": 0.001, "keys": ["a", "b"], "nested": {"consumed": 250}}


@pytest.mark.parametrize("indent", [None, 1])
def test_a_sealed_document_reads_back_as_written(indent: int | None) -> None:
    data = seal_json(DOCUMENT, indent=indent)
    assert is_sealed(data)
    assert json.loads(data)[SEAL_FIELD] != "0" * 32
    assert load_sealed(data, "u", "k") == DOCUMENT


def test_every_single_bit_flip_of_a_sealed_document_is_refused() -> None:
    data = seal_json(DOCUMENT)
    for damaged in bit_flips(data):
        with pytest.raises(FormatError, match="'k'"):
            load_sealed(damaged, "u", "k")


def test_an_unsealed_or_truncated_document_is_refused() -> None:
    with pytest.raises(FormatError, match="has no 'document_xxh3_128'"):
        load_sealed(json.dumps(DOCUMENT).encode(), "u", "k")
    data = seal_json(DOCUMENT)
    with pytest.raises(FormatError):
        load_sealed(data[:-1], "u", "k")


def test_deep_or_huge_json_is_a_clean_format_error() -> None:
    for depth in (300, 5000, 100_000):
        with pytest.raises(FormatError, match="nested more than"):
            parse_json(b"[" * depth + b"]" * depth, "u", "index.json")
    with pytest.raises(FormatError, match="more than the 10 a document may have"):
        parse_json(b"[1, 2, 3, 4, 5]", "u", "k", max_bytes=10)


@pytest.mark.timeout(60)  # a read that blocks on the FIFO fails the test here
def test_a_fifo_is_refused_without_blocking(tmp_path: os.PathLike[str]) -> None:
    store = LocalStore(tmp_path)
    os.mkfifo(os.path.join(tmp_path, "chunk"))
    with pytest.raises(NotFound, match="not a regular file"):
        store.get("chunk")
    with pytest.raises(NotFound):
        store.size("chunk")


def test_links_out_of_the_root_are_neither_read_nor_written(tmp_path: os.PathLike[str]) -> None:
    root, outside = os.path.join(tmp_path, "root"), os.path.join(tmp_path, "outside")
    os.makedirs(os.path.join(root, "step"))
    os.makedirs(outside)
    with open(os.path.join(outside, "secret"), "wb") as f:
        f.write(b"outside")
    os.symlink(outside, os.path.join(root, "step", "linked"))
    os.symlink(os.path.join(outside, "secret"), os.path.join(root, "file"))
    store = LocalStore(root)
    for key in ("step/linked/secret", "file"):
        with pytest.raises(StoreError, match="out of the store's root"):
            store.get(key)
    with pytest.raises(StoreError, match="out of the store's root"):
        store.put("step/linked/new", b"x")
    assert sorted(os.listdir(outside)) == ["secret"]
    os.makedirs(os.path.join(root, "real"))
    os.symlink(os.path.join(root, "real"), os.path.join(root, "inner"))
    store.put("real/a", b"inside")
    assert store.get("inner/a") == b"inside"  # a link that stays inside the root is fine


def test_a_store_rooted_at_the_file_system_root_reads_its_keys(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "data")
    with open(path, "wb") as f:
        f.write(b"at /")
    assert LocalStore("/").get(path[1:]) == b"at /"


def test_open_writer_publishes_whole_or_not_at_all(tmp_path: os.PathLike[str]) -> None:
    from trainio.storage import digest

    store = LocalStore(tmp_path)
    store.put("k", b"old")
    with store.open_writer("k") as writer:
        writer.write(b"new ")
        writer.write(memoryview(b"value"))
        assert store.get("k") == b"old" and writer.position == 9  # nothing visible before the commit
    assert store.get("k") == b"new value"
    with pytest.raises(RuntimeError), store.open_writer("k") as writer:
        writer.write(b"half")
        raise RuntimeError("the producer failed")
    assert store.get("k") == b"new value"
    assert sorted(os.listdir(tmp_path)) == ["k"]  # no temp file left
    writer = store.open_writer("d/e")
    writer.write(b"abc")
    assert writer.commit() == digest(b"abc") and store.get("d/e") == b"abc"
    assert store.local_path("d/e") == store.root / "d" / "e"



def test_temp_names_say_whether_their_maker_is_gone() -> None:
    import socket
    import subprocess
    import sys

    from trainio.storage import TEMP_MARKER, temp_name, temp_owner_is_dead

    ended = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True).stdout)
    host = socket.gethostname()
    assert not temp_owner_is_dead(temp_name())  # this process
    assert temp_owner_is_dead(f"{TEMP_MARKER}w-{host}-{ended}-00ff00ff")
    assert not temp_owner_is_dead(f"{TEMP_MARKER}w-not-{host}-{ended}-00ff00ff")  # another host: never sure
    assert not temp_owner_is_dead(f"{TEMP_MARKER}deadbeef")  # an old name without an owner
    with pytest.raises(ValueError):
        temp_name("a-b")
