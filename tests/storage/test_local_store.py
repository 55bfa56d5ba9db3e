"""LocalStore against the store contract, plus what only a local file system can show."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainio.storage import (
    InvalidKey,
    LocalOptions,
    LocalStore,
    NotFound,
    Store,
    StoreError,
    open_store,
    start_writeback,
)
from trainio.storage._writeback import wait_for_writeback_starts

from .store_contract import StoreContract


class TestLocalStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> LocalStore:
        return LocalStore(tmp_path / "root")

    def raw_put(self, store: Store, key: str, data: bytes) -> None:
        assert isinstance(store, LocalStore)
        (store.root / key).write_bytes(data)

    def raw_get(self, store: Store, key: str) -> bytes:
        assert isinstance(store, LocalStore)
        return (store.root / key).read_bytes()

    def raw_exists(self, store: Store, key: str) -> bool:
        assert isinstance(store, LocalStore)
        return (store.root / key).exists()


def _debris(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".trainio-tmp.")]


def test_url_and_paths(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert store.url == tmp_path.as_uri()
    assert store.path_of("a/b") == tmp_path / "a" / "b"
    with pytest.raises(InvalidKey):
        store.path_of("../etc/passwd")


def test_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match="not a directory"):
        LocalStore(tmp_path / "file")


def test_key_below_an_existing_key_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a", b"file")
    with pytest.raises(StoreError, match="parent of this key is itself a key"):
        store.put("a/b", b"x")
    assert store.get("a") == b"file"


def test_writes_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    LocalStore(tmp_path).put("new/dir/k", b"x")
    assert len(synced) >= 3, "the file, its directory and the new directories' parents must be fsynced"
    synced.clear()
    LocalStore(tmp_path, options=LocalOptions(durable=False)).put("k2", b"x")
    assert synced == []


def _fsynced_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path os.fsync is called on from now on, in order (the calls still happen)."""
    paths: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return paths


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_an_unsynced_write_is_flushed_by_sync_not_by_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    store.put("dir/other", b"o")
    synced = _fsynced_paths(monkeypatch)
    for key in ("dir/a", "dir/b"):
        with store.open_writer(key, sync=False) as writer:
            writer.write(b"x" * 100_000)
    assert synced == [], "a sync=False commit must leave the flush to sync()"
    assert store.get("dir/a") == b"x" * 100_000
    store.sync(["dir/a", "dir/b"])
    assert synced == [str(tmp_path / "dir" / "a"), str(tmp_path / "dir" / "b"), str(tmp_path / "dir")]
    synced.clear()
    with store.open_writer("dir/c") as writer:  # the default still flushes on commit
        writer.write(b"y")
    assert len(synced) >= 2
    synced.clear()
    LocalStore(tmp_path, options=LocalOptions(durable=False)).sync(["dir/a"])
    assert synced == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_starting_a_write_back_returns_at_once_and_keeps_no_descriptor(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        with open(tmp_path / f"f{i}", "wb") as f:
            f.write(os.urandom(1 << 16))
            f.flush()
            start_writeback(f.fileno())  # the caller closes its descriptor at once
    wait_for_writeback_starts()
    assert len(os.listdir("/proc/self/fd")) == before
    child = os.fork()
    if child == 0:  # a forked child starts write-backs with a thread of its own
        with open(tmp_path / "f0", "rb+") as f:
            start_writeback(f.fileno())
        wait_for_writeback_starts()
        os._exit(0)
    assert os.waitpid(child, 0)[1] == 0


def test_sync_refuses_missing_keys_fifos_and_links_out_of_the_root(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    store = LocalStore(tmp_path / "root")
    with pytest.raises(NotFound, match="'gone'.*cannot sync"):
        store.sync(["gone"])
    os.mkfifo(tmp_path / "root" / "fifo")
    with pytest.raises(NotFound, match="not a regular file"):
        store.sync(["fifo"])  # refused at once, not blocked waiting for a writer
    (tmp_path / "outside").write_bytes(b"x")
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(StoreError, match="link"):
        store.sync(["link"])


def test_delete_prunes_empty_directories(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a/b/c/d", b"x")
    store.put("a/keep", b"x")
    store.delete("a/b/c/d")
    assert not (tmp_path / "a" / "b").exists()
    assert (tmp_path / "a" / "keep").exists()


def test_temp_debris_is_never_listed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("d/real", b"x")
    (tmp_path / "d" / ".trainio-tmp.deadbeef").write_bytes(b"half a write")
    assert store.list() == ["d/real"]
    assert not store.exists("d/real.tmp")


def test_symlinks_out_of_the_root_are_not_followed_by_list(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"x")
    store = LocalStore(tmp_path / "root")
    store.put("k", b"v")
    os.symlink(outside, tmp_path / "root" / "link")
    assert store.list() == ["k"]


_KILLED_WRITER = textwrap.dedent("""
    import sys
    from trainio.storage import LocalStore
    store = LocalStore(sys.argv[1])
    payload = b"N" * (64 << 20)
    print("ready", flush=True)
    while True:
        store.put("victim", payload)
""")


def test_writer_killed_mid_put_leaves_old_value_and_no_visible_debris(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("victim", b"the committed value")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 30
        while not _debris(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert _debris(tmp_path), "the writer never got as far as a temp file"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    value = store.get("victim")
    assert value in (b"the committed value", b"N" * (64 << 20)), "a torn value is visible"
    assert store.list() == ["victim"]


_FULL_DISK_WRITER = textwrap.dedent("""
    import resource, signal, sys
    from trainio.storage import LocalStore, StoreError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    store = LocalStore(sys.argv[1])
    try:
        store.put("k", b"x" * (4 << 20))
    except StoreError as exc:
        print("StoreError:", exc)
        store.put("k", b"small enough")
        print("recovered")
""")


def test_full_disk_fails_cleanly_and_keeps_the_old_value(tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes the write fail as a full device would (EFBIG), without a tmpfs mount.
    store = LocalStore(tmp_path)
    store.put("k", b"committed")
    out = subprocess.run([sys.executable, "-c", _FULL_DISK_WRITER, str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert "StoreError:" in out.stdout, out.stderr
    assert "'k'" in out.stdout and "previous value is intact" in out.stdout
    assert "recovered" in out.stdout
    assert store.get("k") == b"small enough"
    assert _debris(tmp_path) == []


def test_open_store_urls(tmp_path: Path) -> None:
    assert open_store(tmp_path) == LocalStore(tmp_path)
    assert open_store(str(tmp_path)) == LocalStore(tmp_path)
    assert open_store(tmp_path.as_uri()) == LocalStore(tmp_path)
    assert open_store(f"file://localhost{tmp_path}") == LocalStore(tmp_path)
    options = LocalOptions(durable=False)
    assert open_store(tmp_path, options=options).options == options  # type: ignore[attr-defined]
    with pytest.raises(StoreError, match="unknown URL scheme 'gs'"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="local path, not host"):
        open_store("file://otherhost/x")


def test_opening_a_missing_root_creates_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "absent")
    assert store.list() == [] and not store.exists("k")
    with pytest.raises(NotFound):
        store.get("k")
    assert store.delete_prefix("") == 0
    assert not (tmp_path / "absent").exists()
    store.put("a/b", b"x")
    assert store.get("a/b") == b"x"
