"""Batches on their way to the trainer's device: the copy, the cut into batches, the consumer's stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .staging import aligned_empty


def to_device(torch: Any, value: np.ndarray | list[Any], device: Any) -> Any:
    """``value`` (a whole-group array, or a list of per-batch items), its arrays copied to ``device``, non-blocking."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value).to(device, non_blocking=True)
    return [torch.from_numpy(v).to(device, non_blocking=True) if isinstance(v, np.ndarray) else v for v in value]


def cut(torch: Any, value: Any, sizes: tuple[int, ...]) -> list[Any] | tuple[Any, ...]:
    """One item per batch: a whole-group array cut along its first axis, or a list of per-batch items (arrays as
    tensors when torch is present)."""
    if isinstance(value, list):
        return [torch.from_numpy(v) if torch is not None and isinstance(v, np.ndarray) else v for v in value]
    if torch is None:
        bounds = np.cumsum(sizes)[:-1].tolist()
        return np.split(value, bounds)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    return value.split(sizes)  # type: ignore[no-any-return]


class DeviceCopy:
    """A group's copy to the device: its event, and the device tensors the group's batches are views of."""

    def __init__(self, event: Any, tensors: list[Any]) -> None:
        self.event = event
        self.tensors = tensors
        self._waited: Any = None

    def wait(self, torch: Any, device: Any) -> bool:
        """Make the consumer's current stream wait for the copy, and tell the allocator that stream uses the
        tensors; once per stream, so a group's later batches cost nothing. Whether the copy was still running
        (the stream may then wait for it), the first time."""
        stream = torch.cuda.current_stream(device)
        if stream == self._waited:
            return False
        running = self._waited is None and not self.event.query()
        stream.wait_event(self.event)
        for tensor in self.tensors:
            tensor.record_stream(stream)
        self._waited = stream
        return running


def staging_allocator(torch: Any, device: Any) -> Callable[[int], np.ndarray]:
    """How staging memory is made, starting on a 64-byte boundary: pinned host memory for a CUDA device, plain
    memory otherwise."""
    if is_cuda(torch, device):
        return lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    return aligned_empty


def is_cuda(torch: Any, device: Any) -> bool:
    """Whether ``device`` is a CUDA device (torch present)."""
    return torch is not None and getattr(device, "type", "cpu") == "cuda"


def resolve_device(device: Any) -> tuple[Any, Any]:
    """(torch or None, the device): refuses a device that needs torch or CUDA where they are missing."""
    try:
        import torch
    except ImportError:
        if str(device) != "cpu":
            raise ValueError(f"device={device!r} needs torch, which is not installed") from None
        return None, "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine")
    return torch, resolved
