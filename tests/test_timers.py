"""nerve._timers.DeadlineQueue: call timeouts without a cancel scope each. Every wait that is
not discarded expires at its deadline, rounded up to the millisecond, never before it; a
discarded one never expires; earlier deadlines added while the runner sleeps wake it."""

from __future__ import annotations

import math

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from nerve._timers import DeadlineQueue

_ops = st.lists(
    st.tuples(st.floats(min_value=0, max_value=2, allow_nan=False),  # wait before this op
              st.floats(min_value=0, max_value=3, allow_nan=False),  # its timeout
              st.booleans(),  # discarded?
              st.floats(min_value=0, max_value=3, allow_nan=False)),  # when discarded, after add
    min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_expires_what_is_not_discarded_on_time(ops: list[tuple[float, float, bool, float]]) -> None:
    fired: dict[int, float] = {}
    due: dict[int, float] = {}
    discarded_before_due: set[int] = set()

    async def main() -> None:
        queue = DeadlineQueue()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run)

            async def discard_later(key: int, token: int, after: float) -> None:
                await trio.sleep(after)
                if token not in fired:
                    queue.discard(key, token)
                    discarded_before_due.add(token)

            for token, (pause, timeout, discard, after) in enumerate(ops):
                await trio.sleep(pause)
                deadline = trio.current_time() + timeout
                due[token] = deadline
                key = queue.add(deadline, token, lambda t=token: fired.setdefault(t, trio.current_time()))
                if discard:
                    nursery.start_soon(discard_later, key, token, after)
            await trio.sleep(10)
            assert len(queue) == 0
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    for token, deadline in due.items():
        if token in discarded_before_due:
            assert token not in fired
            continue
        assert token in fired, f"wait {token} (due {deadline}) never expired"
        assert deadline <= fired[token] <= math.ceil(deadline * 1000) / 1000 + 1e-9


def test_an_earlier_deadline_wakes_a_sleeping_runner() -> None:
    fired: list[str] = []

    async def main() -> None:
        queue = DeadlineQueue()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run)
            queue.add(trio.current_time() + 100, "late", lambda: fired.append("late"))
            await trio.sleep(1)  # the runner now sleeps until 100
            queue.add(trio.current_time() + 1, "early", lambda: fired.append("early"))
            await trio.sleep(1.0015)
            assert fired == ["early"]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_discarded_waits_leave_nothing_behind() -> None:
    """A long timeout on many short calls: what settles first is dropped at once, so memory
    follows the calls in flight, not the timeout's length."""

    async def main() -> None:
        queue = DeadlineQueue()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run)
            for i in range(20_000):
                key = queue.add(trio.current_time() + 3600, i, lambda: None)
                await trio.sleep(0.001)  # one new millisecond bucket per call
                queue.discard(key, i)
            assert len(queue) == 0 and not queue._buckets
            assert len(queue._heap) <= 1024 + 2, len(queue._heap)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
