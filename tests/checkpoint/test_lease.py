"""One writing job per tier: a second job is refused, a dead one's lease and leftovers are taken over.

The second job is a real second process; the S3 cases run against SeaweedFS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.checkpoint import CheckpointManager, Tier
from trainio.checkpoint._tiers.lease import CLOCK_PROBE, LEASE
from trainio.checkpoint._tiers.object import ObjectStepWriter
from trainio.storage import CheckpointError, LocalStore, S3Store, Store, seal_json

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` is the quick lane; .ci/run runs everything

_SECOND_JOB = """
import sys
import numpy as np
from trainio.checkpoint import CheckpointManager, Tier
from trainio.storage import CheckpointError
with CheckpointManager([Tier(sys.argv[1])]) as manager:
    print("steps", manager.steps(), flush=True)
    try:
        manager.save(int(sys.argv[2]), {"w": np.zeros(3)}).wait()
    except CheckpointError as exc:
        print("refused", exc, flush=True)
        sys.exit(3)
print("saved", flush=True)
"""


def _second_job(url: str, step: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _SECOND_JOB, url, str(step)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TRAINIO_RUN_ID": "second-job"})


def _state(step: int) -> dict[str, Any]:
    return {"w": np.full((256, 1024), step, np.float32), "b": np.arange(10) * step, "step": step}


def _forged_lease(store: Store, *, host: str, pid: int, ttl_s: float) -> None:
    store.put(LEASE, seal_json({"format": "trainio.lease", "host": host, "pid": pid, "run": "other-job",
                                "token": "0" * 16, "ttl_s": ttl_s, "written": time.time()}))


def test_a_second_process_never_deletes_an_upload_in_flight_and_the_upload_commits(
        s3_url: str, s3_store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uploaded, go_on = threading.Event(), threading.Event()
    publish = ObjectStepWriter._publish

    def held_publish(self: ObjectStepWriter, manifest: bytes) -> None:
        uploaded.set()  # every file is up, the manifest not yet: mid-promotion
        assert go_on.wait(120)
        publish(self, manifest)

    monkeypatch.setattr(ObjectStepWriter, "_publish", held_publish)
    with CheckpointManager([Tier(tmp_path / "fast"), Tier(s3_url)]) as manager:
        try:
            manager.save(1, _state(1)).wait()
            assert uploaded.wait(60)
            files_before = sorted(s3_store.list("000000000001"))
            second = _second_job(s3_url, 7)  # an eval job or a restarted trainer opening the tier meanwhile
            assert second.returncode == 3, second.stdout + second.stderr
            assert "steps {" in second.stdout and "refused" in second.stdout
            assert "is being written by run" in second.stdout and str(os.getpid()) in second.stdout
            assert sorted(s3_store.list("000000000001")) == files_before  # nothing of the upload was removed
        finally:
            go_on.set()  # a failed assertion must not leave the promotion waiting for it
        manager.wait()
        assert manager.steps()[s3_url] == [1]
        restored = manager.restore(1, tiers=[s3_url])
    np.testing.assert_array_equal(restored["w"], _state(1)["w"])
    assert not s3_store.exists(LEASE)  # released on close
    assert _second_job(s3_url, 7).returncode == 0  # and then the tier is free


def test_an_expired_lease_and_its_dead_writers_leftovers_are_taken_over_on_s3(s3_url: str,
                                                                               s3_store: S3Store) -> None:
    s3_store.put("000000000003/state.zarr/w/c.0.0", b"half an upload")
    _forged_lease(s3_store, host="elsewhere", pid=1, ttl_s=60)
    with CheckpointManager([Tier(s3_url)]) as manager:
        with pytest.raises(CheckpointError, match="run 'other-job' \\(host elsewhere, pid 1\\)"):
            manager.save(4, _state(4))
        assert s3_store.exists("000000000003/state.zarr/w/c.0.0")  # not provably dead yet: kept
    _forged_lease(s3_store, host="elsewhere", pid=1, ttl_s=1)
    time.sleep(3)  # S3 stamps writes to the second
    with CheckpointManager([Tier(s3_url)]) as manager:
        manager.save(4, _state(4)).wait()
        assert manager.steps() == {s3_url: [4]}
    assert not s3_store.list("000000000003")


def test_two_jobs_on_one_local_tier(tmp_path: Path) -> None:
    tier = str(tmp_path / "tier")
    with CheckpointManager([Tier(tier)]) as manager:
        manager.save(1, _state(1)).wait()
        second = _second_job(tier, 2)
        assert second.returncode == 3 and f"pid {os.getpid()}" in second.stdout, second.stdout + second.stderr
        manager.save(3, _state(3)).wait()  # the holder goes on
        assert manager.steps() == {tier: [1, 3]}
    assert _second_job(tier, 5).returncode == 0


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    _forged_lease(store, host=socket.gethostname(), pid=int(dead.stdout), ttl_s=3600)
    with CheckpointManager([Tier(tmp_path)]) as manager:
        manager.save(1, _state(1)).wait()
        assert manager.steps() == {str(tmp_path): [1]}


def test_clock_probes_of_killed_processes_are_removed_by_the_next_holder(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put(f"{CLOCK_PROBE}/killed-mid-probe", b"")
    store.put(f"{CLOCK_PROBE}/reading-the-clock-now", b"")
    long_ago = time.time() - 24 * 3600
    os.utime(tmp_path / CLOCK_PROBE / "killed-mid-probe", (long_ago, long_ago))
    with CheckpointManager([Tier(tmp_path)]) as manager:
        manager.save(1, _state(1)).wait()
    assert store.list(CLOCK_PROBE) == [f"{CLOCK_PROBE}/reading-the-clock-now"]  # a live one's is left alone


def test_a_zombie_that_lost_its_lease_commits_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with CheckpointManager([Tier(tmp_path)], async_save=False) as manager:
        manager.save(1, _state(1))
        _forged_lease(store, host="elsewhere", pid=1, ttl_s=60)  # another job took the tier over
        with pytest.raises(CheckpointError, match="lost the tier's lease"):
            manager.save(2, _state(2))
            manager.wait()
        assert manager.steps() == {str(tmp_path): [1]}
    assert store.exists(LEASE)  # the new holder's lease is not released by the zombie


def test_readers_never_need_the_lease(tmp_path: Path) -> None:
    with CheckpointManager([Tier(tmp_path)]) as manager:
        manager.save(1, _state(1)).wait()
        with CheckpointManager([Tier(tmp_path)]) as reader:
            np.testing.assert_array_equal(reader.restore(1)["w"], _state(1)["w"])


def test_gc_and_promote_from_the_command_line_wait_their_turn(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from trainio.tools._cli import main

    tier, other = str(tmp_path / "tier"), str(tmp_path / "other")
    with CheckpointManager([Tier(tier)]) as manager:
        manager.save(1, _state(1)).wait()
        with CheckpointManager([Tier(other)]) as job:
            job.save(9, _state(9)).wait()
            assert main(["ckpt", "promote", tier, other, "--step", "1"]) == 1
            assert "is being written by run" in capsys.readouterr().err
        assert main(["ckpt", "gc", tier, "--keep-last", "1"]) == 1
        assert "is being written by run" in capsys.readouterr().err
    assert main(["ckpt", "promote", tier, other, "--step", "1"]) == 0
    assert main(["ckpt", "gc", tier, "--keep-last", "1", "--dry-run"]) == 0
    assert not (tmp_path / "tier" / LEASE).exists() and not (tmp_path / "other" / LEASE).exists()


def test_only_a_dead_writers_temp_files_are_removed_by_the_lease_holder(tmp_path: Path) -> None:
    import socket

    from trainio.storage import TEMP_MARKER, temp_name

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    tmp_path.mkdir(exist_ok=True)
    left = tmp_path / f"{TEMP_MARKER}w-{host}-{int(dead.stdout)}-0badcafe"  # a put killed midway
    live = tmp_path / temp_name()  # this process is writing it now
    elsewhere = tmp_path / f"{TEMP_MARKER}save.000000000003-otherhost-{int(dead.stdout)}-0badcafe"
    for path in (left, live):
        path.write_bytes(b"half")
    elsewhere.mkdir()
    with CheckpointManager([Tier(tmp_path)]) as manager:
        manager.save(1, _state(1)).wait()
    assert not left.exists() and live.exists() and elsewhere.exists()
