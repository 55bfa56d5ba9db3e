"""The async twins of the Store methods: the same calls, run on the store's bounded I/O pool."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
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
