"""Restoring into CUDA tensors: chunk files read into reused pinned buffers and copied on a side stream, or read
straight into device memory with kvikio (GPUDirect Storage where the system has it), read back and checked.

Either way no byte reaches a tensor unchecked: the pinned path checks each
file's size and xxh3-128 before copying it up; the kvikio path copies what
it read back down and checks that, and a file that fails is read again
through the pinned path from the next tier that has it whole.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainio.storage import Hasher, IntegrityError

from .._format.boxes import Box, chunk_box, chunk_indices, chunk_origin, contiguous_run
from .._format.dtensor import is_dtensor
from .._format.dtypes import torch_dtype
from .._format.manifest import FileEntry
from .._format.zarr_layout import ArraySpec, chunk_key

GPU_DIRECT_MODES = ("auto", "off", "always")
"""How a restore into CUDA tensors reads: kvikio where GPUDirect Storage runs ("auto"), never ("off"), or always,
even where cuFile or kvikio fall back to POSIX reads ("always": to measure it, or on a file system that pays)."""

PINNED_HOST = "pinned-host"
_BUFFER_BYTES = 32 << 20  # a default chunk file: pinning memory costs about 0.7 s per GiB, so buffers are reused


@dataclass(frozen=True)
class DeviceRun:
    """Where a chunk file's first bytes go: a contiguous byte range of a CUDA tensor (a 1-D uint8 view of it)."""

    memory: Any

    @property
    def nbytes(self) -> int:
        """How many bytes the range holds."""
        return int(self.memory.numel())


def is_cuda_target(spec: ArraySpec, target: Any) -> bool:
    """Whether ``target`` is a CUDA tensor (not a DTensor) of ``spec``'s dtype and shape, to be filled in place."""
    if spec.kind != "torch" or target is None or is_dtensor(target):
        return False
    import torch

    return (isinstance(target, torch.Tensor) and target.device.type == "cuda"
            and target.dtype == torch_dtype(spec.dtype) and tuple(target.shape) == spec.shape)


def device_bytes(spec: ArraySpec, target: Any) -> Any | None:
    """The bytes of ``target`` (a CUDA tensor of ``spec``, see :func:`is_cuda_target`) as a 1-D uint8 tensor, when
    its chunk files can be read straight into it (contiguous, uncompressed, not in the pack); else None."""
    if not spec.stored_alone or spec.codec is not None or not target.is_contiguous():
        return None
    import torch

    return target.detach().reshape(-1).view(torch.uint8)


def fill_from_pack(pack: np.ndarray[Any, Any], members: dict[str, tuple[ArraySpec, Any]]) -> None:
    """Fill CUDA tensors of the step's pack (``pack``: its checked bytes in host memory) on the caller's stream:
    the pack is copied up once, each tensor copied from its place in it on the device."""
    if not members:
        return
    import torch

    on_device: dict[Any, Any] = {}
    with torch.no_grad():
        for spec, target in members.values():
            packed = on_device.get(target.device)
            if packed is None:
                packed = on_device[target.device] = torch.from_numpy(pack).to(target.device)
            assert spec.packed is not None
            start = spec.packed
            target.copy_(packed[start:start + spec.nbytes].view(torch_dtype(spec.dtype)).view(spec.shape))


def device_reads(spec: ArraySpec, memory: Any) -> list[tuple[str, DeviceRun, None]] | None:
    """The chunk files of ``spec`` and the range of ``memory`` (its bytes on the device) each fills; None when a
    chunk is not one run of the array (it must then be placed through host memory)."""
    whole = Box.whole(spec.shape)
    reads: list[tuple[str, DeviceRun, None]] = []
    for index in chunk_indices(whole, spec.chunks):
        part = chunk_box(index, spec.chunks, spec.shape)
        run = contiguous_run(part, whole)
        in_chunk = contiguous_run(part, chunk_origin(index, spec.chunks))
        if run is None or in_chunk is None or in_chunk[0] != 0:
            return None
        start, count = run[0] * spec.itemsize, run[1] * spec.itemsize
        reads.append((chunk_key(spec.path, index), DeviceRun(memory[start:start + count]), None))
    return reads


def kvikio_path() -> str | None:
    """How kvikio would read into device memory here ("gds", "cufile-compat", "kvikio-posix"); None without kvikio
    or a CUDA device."""
    try:
        import kvikio.cufile_driver
        import kvikio.defaults
    except Exception:  # noqa: BLE001 - not installed, or its CUDA libraries are missing: no kvikio here
        return None
    if kvikio.defaults.is_compat_mode_preferred():
        return "kvikio-posix"
    try:
        return "gds" if kvikio.cufile_driver.get("is_gds_available") else "cufile-compat"
    except Exception:  # noqa: BLE001 - the cuFile driver would not say: it cannot be counted on for GDS
        return "cufile-compat"


class DeviceReads:
    """The reads of restores into CUDA tensors, kept by a manager from restore to restore (its pinned buffers too).

    :attr:`path` says how files reach the device: ``"pinned-host"``, or
    kvikio's ``"gds"``, ``"cufile-compat"`` or ``"kvikio-posix"``.
    """

    def __init__(self, mode: str = "auto", buffers: int = 8) -> None:
        if mode not in GPU_DIRECT_MODES:
            raise ValueError(f"gpu_direct={mode!r}: expected one of {', '.join(GPU_DIRECT_MODES)}")
        self.mode = mode
        self._limit = max(buffers, 2)
        self._made = 0
        self._free: list[Any] = []
        self._copying: deque[tuple[Any, Any]] = deque()
        self._lock = threading.Lock()
        self._stream: Any = None
        self._path: str | None = None

    @property
    def path(self) -> str:
        """How this manager's restores read into CUDA tensors (decided at the first one).

        Raises:
            RuntimeError: ``mode`` is "always" and kvikio is not installed.
        """
        if self._path is None:
            found = kvikio_path() if self.mode != "off" else None
            if self.mode == "always" and found is None:
                raise RuntimeError("gpu_direct='always' needs kvikio: pip install 'trainio[gds]'")
            self._path = found if found == "gds" or (self.mode == "always" and found) else PINNED_HOST
        return self._path

    @property
    def direct(self) -> bool:
        """Whether files are read by kvikio straight into device memory."""
        return self.path != PINNED_HOST

    def begin(self, targets: Iterable[Any]) -> None:
        """Before reading into ``targets``: wait for the work the caller's stream has queued on them."""
        import torch

        for device in {t.device for t in targets if t.device.type == "cuda"}:
            torch.cuda.current_stream(device).synchronize()

    def read_direct(self, file: str, entry: FileEntry, run: DeviceRun, url: str, key: str) -> None:
        """Fill ``run`` with the local file ``file`` through kvikio, then check what landed on the device.

        Raises:
            IntegrityError: the file's size or the digest of what was read is not ``entry``'s.
            OSError: the file cannot be read (also when it is larger than ``run``: a padded edge chunk).
        """
        import kvikio

        status = os.lstat(file)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(f"{file}: not a regular file")
        size = status.st_size
        if size != entry.size:
            raise IntegrityError(url, key, entry.xxh3, f"(a file of {size} bytes)",
                                 f"the manifest says {entry.size} bytes; the file was truncated or replaced")
        if size != run.nbytes:
            raise OSError(f"{file}: a padded chunk of {size} bytes for {run.nbytes}: read through host memory")
        with kvikio.CuFile(file, "r") as handle:
            done = handle.pread(run.memory, size).get()
        if done != size:
            raise IntegrityError(url, key, entry.xxh3, f"(read {done} of {size} bytes)", "the file shrank while read")
        actual = self._digest_of(run)
        if actual != entry.xxh3:
            raise IntegrityError(url, key, entry.xxh3, actual)

    def _digest_of(self, run: DeviceRun) -> str:
        """The xxh3-128 of ``run``'s bytes, copied down into a pinned buffer."""
        import torch

        buffer = self.take(run.nbytes)
        try:
            stream = torch.cuda.current_stream(run.memory.device)
            buffer[:run.nbytes].copy_(run.memory, non_blocking=True)
            stream.synchronize()
            hasher = Hasher()
            hasher.update(buffer[:run.nbytes].numpy().data)
            return hasher.hexdigest()
        finally:
            self.release(buffer)

    def take(self, nbytes: int) -> Any:
        """A pinned uint8 buffer of at least ``nbytes`` (waits for a copy to finish when all are lent)."""
        import torch

        while True:
            with self._lock:
                self._reap(wait=False)
                for i, buffer in enumerate(self._free):
                    if buffer.numel() >= nbytes:
                        return self._free.pop(i)
                if self._made < self._limit:
                    self._made += 1
                    break
                if self._free:  # each too small for this file: one is replaced by one that fits
                    self._free.pop()
                    break
                copying = bool(self._copying)
                if copying:
                    self._reap(wait=True)
            if not copying:  # every buffer is being read into by another thread
                time.sleep(0.001)
        return torch.empty(max(nbytes, _BUFFER_BYTES), dtype=torch.uint8, pin_memory=True)

    def release(self, buffer: Any) -> None:
        """Give back a buffer from :meth:`take` that no copy is using."""
        with self._lock:
            self._free.append(buffer)

    def upload(self, buffer: Any, run: DeviceRun) -> None:
        """Copy ``buffer``'s first bytes into ``run`` on the side stream; the buffer comes back once it is done."""
        import torch

        device = run.memory.device
        with self._lock:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            stream = self._stream
        with torch.cuda.stream(stream):
            run.memory.copy_(buffer[:run.nbytes], non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(stream)
        with self._lock:
            self._copying.append((done, buffer))

    def finish(self) -> None:
        """Wait until every copy is on the device; the restored tensors may be used on any stream after."""
        with self._lock:
            if self._stream is not None:
                self._stream.synchronize()
            self._reap(wait=False)

    def _reap(self, *, wait: bool) -> None:
        """Take back the buffers whose copies have finished (with ``wait``, at least the oldest's)."""
        if wait and self._copying:
            self._copying[0][0].synchronize()
        while self._copying and self._copying[0][0].query():
            self._free.append(self._copying.popleft()[1])
