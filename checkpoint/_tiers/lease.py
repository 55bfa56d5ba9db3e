"""One writing job per tier: a lease file, renewed while the job lives, checked before every commit.

``flock`` is unreliable on Lustre and NFS and S3 has no locks, so the lease is
a small sealed document at the top of the tier, ``lease.json``, naming its
holder (host, pid, run id, a token unique to the holding manager) and how long
it lasts. The holder rewrites it every third of that time; a lease whose last
write is older than its time-to-live, measured by the store's own clock (the
lease's and a fresh probe's modification times), has expired and may be taken
over, and so may a lease whose holder is a dead process on this very host.
Readers never take it. In a multi-rank job only the committing rank holds it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainio.storage import (
    AlreadyExists,
    CheckpointError,
    FormatError,
    NotFound,
    Store,
    StoreError,
    load_sealed,
    seal_json,
)

if TYPE_CHECKING:
    from .commit import TierIO

log = logging.getLogger(__name__)

LEASE = "lease.json"
"""The lease's key at the top of a tier."""

CLOCK_PROBE = "lease-clock"
"""The prefix of the empty keys written to read the store's clock, ``lease-clock/<token>``: each lives for a
moment; one is left only by a process killed at that moment, and the next holder removes it."""
_FORMAT = "trainio.lease"


def run_id() -> str:
    """This job's run id: torchrun's ``TORCHELASTIC_RUN_ID``, a scheduler's job id, or the host and pid."""
    for name in ("TRAINIO_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = os.environ.get(name)
        if value:
            return value
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Holder:
    """Who holds a lease."""

    host: str
    pid: int
    run: str
    token: str
    ttl_s: float

    def describe(self) -> str:
        """The holder, for messages."""
        return f"run {self.run!r} (host {self.host}, pid {self.pid})"

    def is_dead_here(self) -> bool:
        """Whether the holder is a process of this host that no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class Lease:
    """The lease of one tier, for one writing manager."""

    def __init__(self, store: Store, label: str, ttl_s: float) -> None:
        self._store = store
        self._label = label
        self.me = Holder(socket.gethostname(), os.getpid(), run_id(), secrets.token_hex(8), ttl_s)
        self.held = False

    def _document(self) -> bytes:
        me = self.me
        return seal_json({"format": _FORMAT, "host": me.host, "pid": me.pid, "run": me.run, "token": me.token,
                          "ttl_s": me.ttl_s, "written": time.time()})

    def current(self) -> Holder | None:
        """The lease's holder as the tier records it; None when there is no lease.

        A damaged lease document counts as no holder's: it is overwritten.
        """
        try:
            document = load_sealed(self._store.get(LEASE), self._store.url, LEASE, max_bytes=4096)
            return Holder(str(document["host"]), int(document["pid"]), str(document["run"]),
                          str(document["token"]), float(document["ttl_s"]))
        except NotFound:
            return None
        except (FormatError, KeyError, TypeError, ValueError) as exc:
            log.warning("%s: the lease is unreadable and is taken over: %s", self._label, exc)
            return None

    def _age(self) -> float:
        """Seconds since the lease was last written, by the store's clock."""
        return self._store_now() - self._store.modified(LEASE)

    def _store_now(self) -> float:
        """The store's clock now: the modification time of a probe written just then."""
        probe = f"{CLOCK_PROBE}/{self.me.token}"
        self._store.put(probe, b"")
        try:
            return self._store.modified(probe)
        finally:
            self._store.delete(probe)

    def remove_dead_probes(self) -> int:
        """Remove clock probes older than the lease's time-to-live by the store's clock; how many.

        A probe lives for the moment of one clock reading, so one that old was
        left by a process killed while it read the clock: provably dead.
        """
        found = self._store.list(CLOCK_PROBE)
        if not found:
            return 0
        now = self._store_now()
        removed = 0
        for key in found:
            try:
                if now - self._store.modified(key) > self.me.ttl_s:
                    self._store.delete(key)
                    removed += 1
            except NotFound:  # its writer finished with it meanwhile
                continue
        return removed

    def acquire(self) -> None:
        """Take the lease, or renew it when this manager holds it already.

        Raises:
            CheckpointError: another live job holds it; the message names the
                holder and when its lease expires.
        """
        holder = self.current()
        if holder is not None and holder.token != self.me.token:
            age = self._age() if not holder.is_dead_here() else float("inf")
            if age <= holder.ttl_s:
                raise CheckpointError(
                    f"{self._label}: the tier is being written by {holder.describe()}, whose lease was renewed "
                    f"{max(age, 0):.0f} s ago and expires in {holder.ttl_s - age:.0f} s; one job writes a tier at a "
                    f"time (stop that job, wait for its lease to expire, or give this job another tier)")
            log.warning("%s: taking over the expired lease of %s", self._label, holder.describe())
            self._store.delete(LEASE)
            holder = None
        try:
            self._store.put(LEASE, self._document(), overwrite=holder is not None)
        except AlreadyExists:
            raise CheckpointError(f"{self._label}: another job took the tier's lease at the same moment; "
                                  f"it is held by {self._holder_text()}") from None
        self.held = True
        try:
            self.remove_dead_probes()
        except StoreError as exc:  # leftovers are harmless; the next holder tries again
            log.warning("%s: could not remove clock probes left by dead processes: %s", self._label, exc)

    def check(self) -> None:
        """Raise unless this manager still holds the lease (before a commit).

        Raises:
            CheckpointError: the lease was taken over or removed; nothing may be committed.
        """
        holder = self.current()
        if holder is None or holder.token != self.me.token:
            self.held = False
            raise CheckpointError(f"{self._label}: this job lost the tier's lease (now held by "
                                  f"{holder.describe() if holder else 'nobody'}); a zombie never commits, so "
                                  "this step was not committed")

    def release(self) -> None:
        """Give the lease up if this manager holds it."""
        if not self.held:
            return
        self.held = False
        try:
            holder = self.current()
            if holder is not None and holder.token == self.me.token:
                self._store.delete(LEASE)
        except StoreError as exc:
            log.warning("%s: could not release the lease (it expires by itself): %s", self._label, exc)

    def _holder_text(self) -> str:
        holder = self.current()
        return holder.describe() if holder else "nobody"


class LeaseKeeper:
    """Renews a manager's leases in the background until :meth:`close`."""

    def __init__(self, leases: list[Lease], ttl_s: float) -> None:
        self._leases = leases
        self._period = ttl_s / 3
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_tiers(cls, tiers: list[TierIO], ttl_s: float) -> LeaseKeeper:
        """A keeper of a lease on each of ``tiers`` (not yet taken), each tier's commits checking its own."""
        leases = [Lease(io.store, io.label, ttl_s) for io in tiers]
        for io, lease in zip(tiers, leases, strict=True):
            io.lease = lease
        return cls(leases, ttl_s)

    def acquire(self, index: int) -> bool:
        """Take lease ``index`` (idempotent) and keep renewing every lease held; whether it was newly taken.

        Raises:
            CheckpointError: the tier's lease is held by another live job.
            StoreError: the tier cannot be reached.
        """
        with self._lock:
            lease = self._leases[index]
            taken = not lease.held
            if taken:
                lease.acquire()
            if self._thread is None:
                self._thread = threading.Thread(target=self._renew, name="trainio-ckpt-lease", daemon=True)
                self._thread.start()
        return taken

    def __len__(self) -> int:
        """How many tiers' leases this keeper is for (the first ones; none on a rank that commits nowhere)."""
        return len(self._leases)

    def holds(self, index: int) -> bool:
        """Whether lease ``index`` is held (as far as the last renewal knows)."""
        return self._leases[index].held if index < len(self._leases) else False

    def _renew(self) -> None:
        while not self._stop.wait(self._period):
            with self._lock:
                for lease in self._leases:
                    if not lease.held:
                        continue
                    try:
                        lease.check()
                        lease.acquire()
                    except (CheckpointError, StoreError, OSError) as exc:
                        log.error("%s", exc)

    def close(self) -> None:
        """Stop renewing and release every lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            for lease in self._leases:
                lease.release()
