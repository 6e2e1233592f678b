"""Running handlers without a task spawn per request: a pool of warm worker tasks.

Profiled (py-spy, 64 calls in flight over TCP): spawning one trio task per request cost a
quarter of the serving process's CPU. Here a request is queued and an idle worker task is
woken (one ``reschedule``); a new worker is spawned only when all are busy. Each request
still runs in a fresh copy of the broker's contextvars context (every step of its coroutine
is driven inside ``Context.run``), so context variables never leak between requests, and its
cancel scopes belong to one task from start to end.
"""

from __future__ import annotations

import contextvars
import logging
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import trio

from nerve.statistics import HandlerPoolStatistics

__all__ = ["HandlerPool"]

log = logging.getLogger("nerve.broker")

_INF = float("inf")


@types.coroutine
def _run_in_context(coro: Coroutine[Any, Any, Any], context: contextvars.Context,
                    pool: HandlerPool) -> Generator[Any, Any, Any]:
    """Drive ``coro`` to completion, each step inside ``context``; traps pass through.

    The first time the coroutine blocks (yields a trap to trio), the pool is told, so that
    another worker takes over the queue meanwhile."""
    send: Any = None
    throw: BaseException | None = None
    blocked = False
    try:
        while True:
            try:
                if throw is None:
                    trap = context.run(coro.send, send)
                else:
                    trap = context.run(coro.throw, throw)
            except StopIteration as done:
                return done.value
            if not blocked:
                blocked = True
                pool._worker_blocked()
            try:
                send = yield trap
                throw = None
            except BaseException as exc:  # delivered by trio (e.g. KeyboardInterrupt): pass it in
                throw = exc
                send = None
    finally:
        if blocked:
            pool._available += 1


class HandlerPool:
    """Counted work items run by reusable worker tasks in one nursery.

    One worker drains the queue for as long as its items finish without blocking, so a burst
    of quick handlers costs one task switch, not one per request; when an item blocks, the
    next worker is woken (or spawned) for the rest of the queue, so a slow handler never
    holds up others. ``max_idle`` workers stay parked between bursts. ``wait_idle`` returns
    once no item is queued or running (graceful stop).

    An item may have a deadline (``start_keyed``): it runs under it as under a trio
    cancel scope of its own, but the scope is the worker's, entered once per worker and
    given each item's deadline in turn. Entering and leaving a scope per request cost about
    8 us here; setting the deadline of one already entered costs about 3 us. A deadline that
    fires ends the worker's scope (a cancelled scope stays cancelled): the worker enters a
    fresh one and goes on.
    """

    def __init__(self, max_idle: int = 64) -> None:
        self.max_idle = max_idle
        self.active = 0
        self.workers = 0
        self._queue: deque[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...], float, Any]] = deque()
        #: keyed items running now, with the scope that runs them (see ``cancel``)
        self._running: dict[Any, trio.CancelScope] = {}
        #: keyed items cancelled while still queued (how many of that key's queued items, the
        #: first ones, are cancelled as they start)
        self._dropped: dict[Any, int] = {}
        #: keyed items queued now (so ``cancel`` never scans the queue)
        self._queued_keys: dict[Any, int] = {}
        self._idle: list[Any] = []
        #: workers that will look at the queue without a wake-up (woken, spawned, or
        #: running an item that has not blocked)
        self._available = 0
        self._drained = trio.Event()
        self._drained.set()
        self._nursery: trio.Nursery | None = None
        self._context: contextvars.Context | None = None

    def bind(self, nursery: trio.Nursery | None) -> None:
        self._nursery = nursery
        self._context = contextvars.copy_context() if nursery is not None else None
        if nursery is None:
            self._idle.clear()
            self._queue.clear()
            self._running.clear()
            self._dropped.clear()
            self._queued_keys.clear()
            self._available = 0
            self.workers = 0

    def statistics(self) -> HandlerPoolStatistics:
        return HandlerPoolStatistics(active=self.active, queued=len(self._queue), workers=self.workers,
                                     idle_workers=len(self._idle))

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` soon; its exceptions are logged (it should handle its own)."""
        self.start_keyed(None, _INF, fn, *args)

    def cancel(self, key: Any) -> bool:
        """Cancel the item started with ``key`` (running: its scope is cancelled; queued: it
        is cancelled as it starts). False if no such item is running."""
        scope = self._running.get(key)
        if scope is not None and not scope.cancel_called:
            scope.cancel()
            return True
        dropped = self._dropped.get(key, 0)
        if self._queued_keys.get(key, 0) > dropped:
            self._dropped[key] = dropped + 1
            return True
        return False

    def start_keyed(self, key: Any, deadline: float, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` soon, cancelled at ``deadline`` (trio clock; inf: none) if still
        running, and by ``cancel(key)`` (``key`` None: not cancellable by key)."""
        if self._nursery is None:
            from nerve.errors import BrokerNotRunningError

            raise BrokerNotRunningError("the broker is not running")
        self.active += 1
        if self._drained.is_set():
            self._drained = trio.Event()
        self._queue.append((fn, args, deadline, key))
        if key is not None:
            self._queued_keys[key] = self._queued_keys.get(key, 0) + 1
        if self._available == 0:
            self._wake_one()

    def _wake_one(self) -> None:
        self._available += 1
        if self._idle:
            trio.lowlevel.reschedule(self._idle.pop())
        else:
            assert self._nursery is not None
            self.workers += 1
            self._nursery.start_soon(self._worker, name="nerve handler worker")

    def _worker_blocked(self) -> None:
        self._available -= 1
        if self._queue and self._available == 0:
            self._wake_one()

    async def _worker(self) -> None:
        try:
            while True:
                with trio.CancelScope() as scope:
                    if not await self._run_items(scope):
                        return
        finally:
            self.workers -= 1

    async def _run_items(self, scope: trio.CancelScope) -> bool:
        """Run queued items under ``scope``; False when this worker should retire, True when a
        deadline cancelled the scope (the caller enters a new one)."""
        queue = self._queue
        base = self._context
        assert base is not None
        current = _INF  # the scope's deadline, without the property's cost
        while True:
            while queue:
                fn, args, deadline, key = queue.popleft()
                if deadline != current:
                    scope.deadline = current = deadline
                if key is not None:
                    left = self._queued_keys.pop(key) - 1
                    if left:
                        self._queued_keys[key] = left
                    self._running[key] = scope
                    if self._dropped and key in self._dropped:
                        dropped = self._dropped.pop(key) - 1
                        if dropped:
                            self._dropped[key] = dropped
                        scope.cancel()
                try:
                    await _run_in_context(fn(*args), base.copy(), self)  # type: ignore[arg-type]
                except Exception:
                    log.exception("handler task %r failed", fn)
                finally:
                    if key is not None and self._running.get(key) is scope:
                        del self._running[key]
                    self.active -= 1
                    if self.active == 0:
                        self._drained.set()
                if scope.cancel_called:  # fired, and the item did not let Cancelled out
                    return True
            if current != _INF:
                scope.deadline = current = _INF  # no deadline may fire on a parked worker
            self._available -= 1
            if len(self._idle) >= self.max_idle:
                return False
            await self._park()

    async def _park(self) -> None:
        task = trio.lowlevel.current_task()
        self._idle.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            if task in self._idle:
                self._idle.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def wait_idle(self) -> None:
        await self._drained.wait()
