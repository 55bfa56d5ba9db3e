"""The async twins of the Store methods: the same calls, run on the store's bounded I/O pool (one per process)."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class _Offloading(Protocol):
    async def _offload(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R: ...


S = TypeVar("S", bound=_Offloading)


def twin(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """The async twin of a blocking store method: the same call, awaited, run on the store's I/O pool.

    The twin calls the method by name, so a backend's override is the one that runs.
    """
    name = method.__name__

    async def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        call: Callable[..., R] = getattr(self, name)
        return await self._offload(call, *args, **kwargs)

    run.__name__ = run.__qualname__ = f"{name}_async"
    run.__doc__ = f"Async twin of :meth:`{name}`."
    return run


class ProcessPool:
    """A pool of ``threads`` threads, made on first use in each process (a forked child makes its own).

    Pickles as its size and name only: an unpickled copy starts without threads.
    """

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError(f"{name}: a pool of {threads} threads; it needs at least 1")
        self.threads = threads
        self._name = name
        self._reset()

    def _reset(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"threads": self.threads, "_name": self._name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def executor(self) -> ThreadPoolExecutor:
        """This process's pool."""
        pid = os.getpid()
        if self._pool is None or self._pid != pid:
            with self._lock:
                if self._pool is None or self._pid != pid:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=self._name)
                    self._pid = pid
        return self._pool

    async def run(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """``fn(*args, **kwargs)``, awaited, run on this process's pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor(), functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        """Stop the threads (after their work); the pool is made anew if used again."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
