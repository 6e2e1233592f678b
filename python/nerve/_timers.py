"""Deadlines for many short waits without a trio cancel scope each.

A trio ``CancelScope`` with a deadline costs about 8 us to enter and leave here (py-spy: a
quarter of both processes' CPU when every call of a 64-in-flight run had ``timeout=``). A
call's timeout only has to wake one parked task, so instead each waiting call is put in a
bucket of its deadline, rounded up to the millisecond, and one task per broker sleeps until
the earliest bucket that still holds a call and expires what is in it. Adding and removing a
call are a dict insert and a dict pop.

A deadline fires at most about a millisecond late (the bucket's rounding plus the wake-up),
never early.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["DeadlineQueue"]

_INF = math.inf


class DeadlineQueue:
    """Callbacks due at deadlines; ``add`` returns a key for ``discard``. Run ``run`` in a task."""

    def __init__(self) -> None:
        self._buckets: dict[int, dict[Any, Callable[[], None]]] = {}
        self._heap: list[int] = []
        self._sleep: trio.CancelScope | None = None  # the runner's sleep, while it sleeps
        self._target = _INF  # what the runner sleeps until
        self._idle: trio.Event | None = None  # the runner waits on it while nothing is due

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def add(self, deadline: float, token: Any, expire: Callable[[], None]) -> int:
        """Call ``expire()`` at ``deadline`` (trio clock, finite) unless ``token`` is discarded
        first. ``token`` must be unique among the waits of that millisecond."""
        key = math.ceil(deadline * 1000)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            heap = self._heap
            if len(heap) > 2 * len(self._buckets) + 1024:
                # Keys of buckets emptied by discard: drop them rather than keep one per
                # millisecond of the longest timeout.
                heap[:] = list(self._buckets)
                heapq.heapify(heap)
            else:
                heapq.heappush(heap, key)
            when = key / 1000
            if when < self._target:
                self._target = when
                if self._sleep is not None:
                    self._sleep.deadline = when
            if self._idle is not None:
                self._idle.set()
        bucket[token] = expire
        return key

    def discard(self, key: int, token: Any) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.pop(token, None)
            if not bucket:
                del self._buckets[key]

    async def run(self) -> None:
        buckets, heap = self._buckets, self._heap
        while True:
            while heap and heap[0] not in buckets:
                heapq.heappop(heap)
            if not heap:
                self._target = _INF
                self._idle = trio.Event()
                await self._idle.wait()
                self._idle = None
                continue
            when = heap[0] / 1000
            if when > trio.current_time():
                self._target = when
                with trio.CancelScope(deadline=when) as self._sleep:
                    await trio.sleep_forever()
                self._sleep = None
                continue
            due = buckets.pop(heapq.heappop(heap))
            for expire in list(due.values()):
                try:
                    expire()
                except Exception:  # pragma: no cover - the callbacks are nerve's own
                    import logging

                    logging.getLogger("nerve.broker").exception("a deadline callback failed")
            await trio.lowlevel.checkpoint()
