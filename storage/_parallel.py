"""Bounded parallel runs of blocking jobs on a thread pool."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")


def run_all(pool: ThreadPoolExecutor, jobs: Iterator[Callable[[], T]], limit: int) -> list[T]:
    """Run ``jobs`` on ``pool``, at most ``limit`` at a time; their results in order, or the first error.

    On an error, jobs not yet started are cancelled and running ones are
    waited for, so no job outlives the call (they may write into the caller's buffers).
    """
    futures: list[Future[T]] = []
    running: set[Future[T]] = set()
    try:
        for job in jobs:
            while len(running) >= limit:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
            future = pool.submit(job)
            futures.append(future)
            running.add(future)
        wait(futures, return_when=FIRST_EXCEPTION)
        return [future.result() for future in futures]
    finally:
        for future in futures:
            future.cancel()
        wait(futures)


def in_thread(work: Callable[[], T], name: str) -> Future[T]:
    """``work()`` run in a new daemon thread named ``name``: its result, or its error, in the future."""
    future: Future[T] = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(work())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


BATCH_BYTES = 4 << 20
"""Items smaller than this are grouped by :func:`batched`, and come after every bigger one."""
BATCH_ITEMS = 64


def batched(items: list[T], size: Callable[[T], int], batch_bytes: int = BATCH_BYTES,
            batch_items: int = BATCH_ITEMS) -> Iterator[list[T]]:
    """Big items one by one, biggest first; small ones grouped, so handing jobs to threads stays cheap."""
    batch: list[T] = []
    total = 0
    for item in sorted(items, key=lambda i: -size(i)):
        if size(item) >= batch_bytes:
            yield [item]
            continue
        batch.append(item)
        total += size(item)
        if total >= batch_bytes or len(batch) >= batch_items:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch
