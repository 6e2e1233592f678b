"""HandlerPool's keyed items (cancellation crossing the wire relies on them): a property test
against a reference model, on trio's MockClock."""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from nerve._dispatch import HandlerPool

# an op: ("start", key, duration) | ("cancel", key) | ("sleep", seconds)
ops = st.lists(
    st.one_of(
        # durations never a sum of sleeps (0.25 s steps): no item ends at the instant of an op
        st.tuples(st.just("start"), st.integers(0, 5), st.sampled_from([0.7, 1.9])),
        st.tuples(st.just("cancel"), st.integers(0, 6)),
        st.tuples(st.just("sleep"), st.sampled_from([0.0, 0.25, 1.0])),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_keyed_items_end_as_the_reference_model_says(script: list[tuple]) -> None:  # type: ignore[type-arg]
    outcome: dict[int, str] = {}   # item number -> "done" | "cancelled"
    model: dict[int, str] = {}

    async def main() -> None:
        pool = HandlerPool(max_idle=2)
        started_at: dict[int, float] = {}
        live: dict[int, tuple[int, float]] = {}  # key -> (item, end time) of the model's unfinished item
        async with trio.open_nursery() as nursery:
            pool.bind(nursery)
            n = 0
            for op in script:
                now = trio.current_time()
                # the model: items whose time is up are done
                for key, (item, end) in list(live.items()):
                    if end <= now:
                        model[item] = "done"
                        del live[key]
                if op[0] == "start":
                    _, key, duration = op
                    if key in live:  # the transit never starts two items with one key
                        continue
                    item = n
                    n += 1

                    async def run(item: int = item, duration: float = duration) -> None:
                        started_at[item] = trio.current_time()
                        try:
                            await trio.sleep(duration)
                        except trio.Cancelled:
                            outcome[item] = "cancelled"
                            raise
                        outcome[item] = "done"

                    pool.start_keyed(key, float("inf"), run)
                    live[key] = (item, now + duration)
                elif op[0] == "cancel":
                    found = pool.cancel(op[1])
                    assert found == (op[1] in live)
                    if op[1] in live:
                        model[live.pop(op[1])[0]] = "cancelled"
                else:
                    await trio.sleep(op[1])
            await trio.sleep(10)
            for key, (item, _) in live.items():
                model[item] = "done"
            await pool.wait_idle()
            assert pool.active == 0
            assert not pool._queued_keys and not pool._running and not pool._dropped  # noqa: SLF001
            pool.bind(None)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # an item cancelled before it could start never runs its body: it counts as cancelled
    for item, expected in model.items():
        assert outcome.get(item, "cancelled") == expected, (item, script)
