"""DESIGN section 3, deadlines: the ``timeout`` option and the caller's cancel scope both bound a
call (the earlier wins); the remaining budget travels in the REQ and the callee runs under it;
its nested calls get what remains; a call with no budget left fails locally without sending."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import trio

import nerve
from nerve.errors import NerveError, RequestSkippedError, RequestTimeoutError

pytestmark = pytest.mark.anyio


def remaining() -> float:
    return trio.current_effective_deadline() - trio.current_time()


class Slow(nerve.Service):
    name = "slow"

    def __init__(self) -> None:
        self.budgets: list[float] = []
        self.entered = 0
        self.completed = 0
        self.cancelled = 0

    @nerve.action
    async def sleep(self, ctx: nerve.Context) -> str:
        self.budgets.append(remaining())
        self.entered += 1
        try:
            await trio.sleep(ctx.params.get("for", 2.0) if isinstance(ctx.params, dict) else 2.0)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        self.completed += 1
        return "done"

    @nerve.action
    async def budget(self, ctx: nerve.Context) -> float:
        self.budgets.append(remaining())
        return remaining()


async def wait_until(pred: Any, timeout: float = 3.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
async def test_timeout_option_on_slow_handler(remote: bool) -> None:
    slow = Slow()
    async with nerve.Broker("dl-t-client", services=[] if remote else [slow]) as client, \
            nerve.Broker("dl-t-server", services=[slow] if remote else []):
        await client.wait_for_services("slow")
        t0 = trio.current_time()
        with pytest.raises(RequestTimeoutError) as info:
            await client.call("slow.sleep", {"for": 5.0}, timeout=0.2)
        elapsed = trio.current_time() - t0
        assert 0.18 <= elapsed < 0.6
        exc = info.value
        assert exc.code == 504
        assert exc.retryable is True
        assert exc.type == "REQUEST_TIMEOUT"
        # The callee ran under the same budget and was cancelled, not left sleeping.
        await wait_until(lambda: slow.cancelled == 1, 2.0)
        assert slow.completed == 0
        assert 0.1 < slow.budgets[0] <= 0.2 + 1e-3


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
async def test_callers_cancel_scope_bounds_the_call_and_wins_when_earlier(remote: bool) -> None:
    slow = Slow()
    async with nerve.Broker("dl-c-client", services=[] if remote else [slow]) as client, \
            nerve.Broker("dl-c-server", services=[slow] if remote else []):
        await client.wait_for_services("slow")
        # Several times each: the result must not depend on who wins a sub-millisecond race
        # between the caller's own deadline and the callee's (which is the same deadline).
        for attempt in range(3):
            t0 = trio.current_time()
            with trio.move_on_after(0.15) as cs:
                await client.call("slow.sleep", {"for": 5.0}, timeout=3.0)  # must not raise
            elapsed = trio.current_time() - t0
            assert cs.cancelled_caught, attempt
            assert 0.13 <= elapsed < 1.5  # far below the 3 s timeout= and the 5 s sleep
            # The cancel scope's budget (not the longer timeout=) travelled to the callee.
            assert 0.1 < slow.budgets[-1] <= 0.15 + 1e-3
            await wait_until(lambda: slow.cancelled == attempt + 1, 2.0)
        assert slow.completed == 0

        # Without timeout= at all, the cancel scope alone bounds it.
        for attempt in range(3):
            with trio.move_on_after(0.1) as cs:
                await client.call("slow.sleep", {"for": 5.0})  # must not raise
            assert cs.cancelled_caught, attempt
            assert 0.05 < slow.budgets[-1] <= 0.1 + 1e-3
            await wait_until(lambda: slow.cancelled == attempt + 4, 2.0)
        assert slow.completed == 0


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
async def test_timeout_option_wins_when_earlier_than_the_cancel_scope(remote: bool) -> None:
    slow = Slow()
    async with nerve.Broker("dl-w-client", services=[] if remote else [slow]) as client, \
            nerve.Broker("dl-w-server", services=[slow] if remote else []):
        await client.wait_for_services("slow")
        t0 = trio.current_time()
        with trio.move_on_after(3.0) as cs:
            with pytest.raises(RequestTimeoutError):
                await client.call("slow.sleep", {"for": 5.0}, timeout=0.15)
        assert not cs.cancelled_caught
        assert trio.current_time() - t0 < 1.0
        assert slow.budgets[0] <= 0.15 + 1e-3


async def test_no_budget_means_no_deadline_for_the_callee() -> None:
    slow = Slow()
    async with nerve.Broker("dl-n-client") as client, nerve.Broker("dl-n-server", services=[slow]):
        await client.wait_for_services("slow")
        assert await client.call("slow.budget") == math.inf
        assert 1.0 < await client.call("slow.budget", timeout=2.0) <= 2.0 + 1e-3  # ms rounding


# --- the budget travels along a chain ---------------------------------------------------

HOP = 0.15
BUDGET = 0.4  # A enters with 0.4, B with ~0.25, C with ~0.1: C's sleep runs the budget out


class Hop(nerve.Service):
    def __init__(self, name: str, target: str | None, log: dict[str, dict[str, Any]]) -> None:
        self.name = name
        self.target = target
        self.log = log

    @nerve.action
    async def run(self, ctx: nerve.Context) -> str:
        entry = self.log.setdefault(self.name, {})
        entry["budget"] = remaining()
        entry["entered"] = trio.current_time()
        try:
            await trio.sleep(HOP)
        except trio.Cancelled:
            entry["cancelled"] = trio.current_time()
            raise
        entry["slept"] = True
        if self.target is None:
            entry["completed"] = True
            return self.name
        try:
            out = await ctx.call(f"{self.target}.run")
        except NerveError as exc:
            entry["error"] = exc
            raise
        entry["completed"] = True
        return f"{self.name}>{out}"


async def test_remaining_budget_travels_and_shrinks_hop_by_hop() -> None:
    log: dict[str, dict[str, Any]] = {}
    async with nerve.Broker("dl-chain-client") as client, \
            nerve.Broker("dl-chain-1", services=[Hop("hopa", "hopb", log), Hop("hopd", None, log)]), \
            nerve.Broker("dl-chain-2", services=[Hop("hopb", "hopc", log)]), \
            nerve.Broker("dl-chain-3", services=[Hop("hopc", "hopd", log)]):
        await client.wait_for_services("hopa", "hopb", "hopc", "hopd")
        t0 = trio.current_time()
        with pytest.raises(RequestTimeoutError):
            await client.call("hopa.run", timeout=BUDGET)
        elapsed = trio.current_time() - t0
        # About the budget, not the sum of the sleeps (4 * HOP = 0.6s and more).
        assert BUDGET - 0.02 <= elapsed < BUDGET + 0.12
        # Let anything that would still run finish, then look.
        await trio.sleep(3 * HOP)

    assert set(log) == {"hopa", "hopb", "hopc"}, "D must never be called: no budget reached it"
    a, b, c = log["hopa"], log["hopb"], log["hopc"]
    # The budget each callee observed shrinks hop by hop, by about one hop's sleep.
    assert BUDGET - 0.03 <= a["budget"] <= BUDGET + 1e-3
    assert a["budget"] > b["budget"] > c["budget"] > 0
    assert a["budget"] - b["budget"] == pytest.approx(HOP, abs=0.05)
    assert b["budget"] - c["budget"] == pytest.approx(HOP, abs=0.05)
    # The innermost handler was cancelled in its sleep and never completed.
    assert "cancelled" in c and "slept" not in c and "completed" not in c
    assert c["cancelled"] - t0 == pytest.approx(BUDGET, abs=0.06)
    # Nobody up the chain completed either.
    assert "completed" not in a and "completed" not in b


# --- no budget left: fail locally, send nothing -----------------------------------------


class Spender(nerve.Service):
    name = "spender"

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    @nerve.action
    async def run(self, ctx: nerve.Context) -> str:
        time.sleep(0.15)  # burn the whole budget without a checkpoint
        try:
            return await ctx.call("slow.budget")
        except BaseException as exc:
            self.errors.append(exc)
            raise


async def test_nested_call_without_budget_is_skipped_without_sending() -> None:
    spender, slow = Spender(), Slow()
    async with nerve.Broker("dl-s-client") as client, \
            nerve.Broker("dl-s-mid", services=[spender]) as mid, \
            nerve.Broker("dl-s-far", services=[slow]) as far:
        await client.wait_for_services("spender", "slow")
        await mid.wait_for_services("slow")
        out_before = mid.transit.requests_sent
        in_before = far.transit.requests_received
        with pytest.raises(NerveError) as info:
            await client.call("spender.run", timeout=0.1)
        await wait_until(lambda: spender.errors, 2.0)
        exc = spender.errors[0]
        assert isinstance(exc, RequestSkippedError)
        assert mid.transit.requests_sent == out_before  # nothing was sent...
        assert far.transit.requests_received == in_before  # ...and nothing arrived
        assert slow.budgets == []
        # A skipped call is a timeout error (for the handler and for the caller).
        assert isinstance(exc, RequestTimeoutError)
        assert isinstance(info.value, RequestTimeoutError)


async def test_top_level_call_in_an_expired_scope_is_skipped_without_sending() -> None:
    slow = Slow()
    async with nerve.Broker("dl-x-client") as client, nerve.Broker("dl-x-far", services=[slow]) as far:
        await client.wait_for_services("slow")
        with trio.move_on_after(0.05):
            time.sleep(0.08)
            with pytest.raises(RequestSkippedError) as info:
                await client.call("slow.budget")
        assert client.transit.requests_sent == 0
        assert far.transit.requests_received == 0
        assert slow.budgets == []
        assert isinstance(info.value, RequestTimeoutError)  # a skipped call is a timeout error


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
async def test_nested_timeout_option_and_inherited_budget_earlier_wins(remote: bool) -> None:
    class Mid(nerve.Service):
        name = "mid"

        @nerve.action
        async def run(self, ctx: nerve.Context) -> float:
            return await ctx.call("slow.budget", timeout=ctx.params["t"])

    slow = Slow()
    async with nerve.Broker("dl-e-a", services=[Mid()] + ([] if remote else [slow])) as a, \
            nerve.Broker("dl-e-b", services=[slow] if remote else []):
        await a.wait_for_services("mid", "slow")
        # The inherited budget (0.3) is earlier than the nested timeout= (5).
        seen = await a.call("mid.run", {"t": 5.0}, timeout=0.3)
        assert 0.2 < seen <= 0.3 + 1e-3
        # The nested timeout= (0.1) is earlier than the inherited budget (5).
        seen = await a.call("mid.run", {"t": 0.1}, timeout=5.0)
        assert 0.05 < seen <= 0.1 + 1e-3


# --- nerve._deadline: the hot path's own reading of the effective deadline ---------------

_scope_kinds = st.lists(
    st.tuples(st.sampled_from(["plain", "deadline", "relative", "shield", "cancelled", "task"]),
              st.floats(min_value=-5, max_value=1000, allow_nan=False)),
    max_size=8)


@settings(max_examples=200, deadline=None)
@given(_scope_kinds)
def test_effective_deadline_matches_trio(kinds: list[tuple[str, float]]) -> None:
    """Any nesting of scopes (absolute and relative deadlines, shields, cancelled scopes and
    child tasks): the fast walk gives exactly what trio's own function gives."""
    from nerve._deadline import _walk, effective_deadline

    assert effective_deadline is _walk, "trio's internals changed: the fast path is off"
    seen: list[tuple[float, float]] = []

    async def nest(rest: list[tuple[str, float]]) -> None:
        seen.append((_walk(), trio.current_effective_deadline()))
        if not rest:
            return
        (kind, value), tail = rest[0], rest[1:]
        if kind == "task":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(nest, tail)
            return
        scope = trio.CancelScope()
        if kind == "deadline":
            scope.deadline = trio.current_time() + value
        elif kind == "relative":
            scope = trio.CancelScope(relative_deadline=max(value, 0.0))
        elif kind == "shield":
            scope.shield = True
        elif kind == "cancelled":
            scope.cancel()
        with scope:
            await nest(tail)
            seen.append((_walk(), trio.current_effective_deadline()))

    trio.run(nest, kinds)
    assert seen and all(ours == theirs for ours, theirs in seen), seen
