"""Fault tolerance (docs/middleware.md, "Fault tolerance"): the circuit breaker's states on
virtual time, the bulkhead's limits and queue, and fallbacks. First the middlewares alone
(their handlers called directly with a stand-in endpoint), with a hypothesis state-machine
test of the breaker against a reference model; then through real brokers, in-process and on
loopback TCP."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nerve
from nerve.errors import (
    BrokerOptionsError,
    CircuitBreakerOpenError,
    NerveError,
    QueueIsFullError,
    RequestTimeoutError,
    ServerError,
    ServiceSchemaError,
    ValidationError,
)
from nerve.middleware import ActionInfo, EventInfo
from nerve.middlewares import Bulkhead, BulkheadStatistics, CircuitBreaker, CircuitStatistics
from nerve.registry import ActionEndpoint

pytestmark = pytest.mark.anyio

HERE = "caller"  # the node the stand-in calls are made on


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Virtual time: half-open times and windows are exact whatever the machine's load."""
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


@asynccontextmanager
async def bounded_nursery(limit: float = 60) -> AsyncIterator[trio.Nursery]:
    """A nursery that fails the test, rather than hanging it, if its tasks never end (on the
    mock clock a deadlock jumps straight to the limit)."""
    with trio.fail_after(limit):
        async with trio.open_nursery() as nursery:
            yield nursery


# --- stand-ins for the middlewares alone ---------------------------------------------------


@dataclass
class FakeBroker:
    node_id: str = HERE


@dataclass
class FakeCtx:
    endpoint: Any
    node_id: str | None = HERE
    broker: FakeBroker = field(default_factory=FakeBroker)


class Callee:
    """The handler a middleware wraps: counts its calls; ``error`` (a factory) makes it fail,
    ``delay`` makes it take that long."""

    def __init__(self) -> None:
        self.calls = 0
        self.running = 0
        self.most = 0
        self.error: Callable[[], BaseException] | None = None
        self.delay = 0.0
        self.release: trio.Event | None = None
        self.order: list[int] = []

    async def __call__(self, ctx: Any) -> str:
        self.calls += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if getattr(ctx, "tag", None) is not None:
                self.order.append(ctx.tag)
            if self.release is not None:
                await self.release.wait()
            await trio.sleep(self.delay)
            if self.error is not None:
                raise self.error()
            return "ok"
        finally:
            self.running -= 1


def endpoint(node_id: str = "n2", action: str = "svc.act") -> ActionEndpoint:
    return ActionEndpoint(action, node_id, node_id == HERE, "svc")


def info(action: str = "svc.act", node_id: str = "n2", **properties: Any) -> ActionInfo:
    return ActionInfo(name=action, service="svc", node_id=node_id, local=node_id == HERE,
                      properties=properties)


def breaker_on(cb: CircuitBreaker, *, local: bool = False, **properties: Any) -> tuple[Any, Callee]:
    callee = Callee()
    wrap = cb.local_action if local else cb.remote_action
    return wrap(callee, info(node_id=HERE if local else "n2", **properties)), callee


async def outcome(handler: Any, ctx: Any) -> str:
    """'ok', 'fail' (the callee's error) or 'fast' (CircuitBreakerOpenError)."""
    try:
        await handler(ctx)
    except CircuitBreakerOpenError:
        return "fast"
    except Exception:
        return "fail"
    return "ok"


def boom() -> NerveError:
    return ServerError("boom")  # 500


def state(cb: CircuitBreaker, node: str = "n2", action: str = "svc.act") -> str:
    return cb.statistics(action, node).state


# --- circuit breaker, alone --------------------------------------------------------------


async def test_opens_once_min_request_count_calls_reach_the_threshold() -> None:
    cb = CircuitBreaker(threshold=0.5, min_request_count=4, window_time=60, half_open_time=10)
    handler, callee = breaker_on(cb)
    ep = endpoint()
    ctx = FakeCtx(ep)
    for expected in ["fail", "ok", "fail"]:
        callee.error = boom if expected == "fail" else None
        assert await outcome(handler, ctx) == expected
    assert cb.statistics("svc.act", "n2") == CircuitStatistics("closed", 3, 2)
    assert ep.available

    # The 4th call is a success, yet 2 failures of 4 calls reach 0.5: it opens (as Moleculer).
    callee.error = None
    assert await outcome(handler, ctx) == "ok"
    assert state(cb) == "open" and not ep.available

    # Open: fails fast, the callee is not called.
    calls = callee.calls
    with pytest.raises(CircuitBreakerOpenError) as info_:
        await handler(ctx)
    assert callee.calls == calls
    assert info_.value.code == 503 and info_.value.retryable
    assert info_.value.data == {"action": "svc.act", "nodeID": "n2"}


async def test_stays_closed_below_the_threshold_or_below_min_request_count() -> None:
    cb = CircuitBreaker(threshold=0.5, min_request_count=4, window_time=60, half_open_time=10)
    handler, callee = breaker_on(cb)
    ctx = FakeCtx(endpoint())
    callee.error = boom
    for _ in range(3):  # 100 % failures, but only 3 calls
        assert await outcome(handler, ctx) == "fail"
    assert state(cb) == "closed"

    cb = CircuitBreaker(threshold=0.5, min_request_count=4, window_time=60, half_open_time=10)
    handler, callee = breaker_on(cb)
    for i in range(40):  # 1 failure in 3: below the threshold however many calls
        callee.error = boom if i % 3 == 2 else None
        await outcome(handler, ctx)
    assert state(cb) == "closed"


async def test_threshold_is_compared_as_moleculer_does() -> None:
    """3 failures in 10 calls reach 0.3 (3 / 10 >= 0.3; 0.3 * 10 would be 3.0000000000000004)."""
    cb = CircuitBreaker(threshold=0.3, min_request_count=10)
    handler, callee = breaker_on(cb)
    ctx = FakeCtx(endpoint())
    for i in range(10):
        callee.error = boom if i < 3 else None
        await outcome(handler, ctx)
    assert state(cb) == "open"


async def open_it(cb: CircuitBreaker, handler: Any, callee: Callee, ctx: Any) -> None:
    callee.error = boom
    for _ in range(100):
        if state(cb, ctx.endpoint.node_id) == "open":
            break
        assert await outcome(handler, ctx) == "fail"
    assert state(cb, ctx.endpoint.node_id) == "open"
    callee.error = None


async def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    cb = CircuitBreaker(min_request_count=2, half_open_time=10)
    handler, callee = breaker_on(cb)
    ep = endpoint()
    ctx = FakeCtx(ep)
    await open_it(cb, handler, callee, ctx)
    opened = trio.current_time()

    await trio.sleep(9.5)
    assert await outcome(handler, ctx) == "fast"
    assert state(cb) == "open" and not ep.available

    await trio.sleep_until(opened + 10)
    assert state(cb) == "half_open" and ep.available  # selection may choose it again
    calls = callee.calls
    callee.delay = 1.0
    results: list[str] = []
    async with bounded_nursery() as nursery:
        async def probe() -> None:
            results.append(await outcome(handler, ctx))

        nursery.start_soon(probe)
        await trio.sleep(0.5)
        assert state(cb) == "half_open_wait" and not ep.available
        assert await outcome(handler, ctx) == "fast"  # one probe only
    assert results == ["ok"] and callee.calls == calls + 1
    assert cb.statistics("svc.act", "n2") == CircuitStatistics("closed", 0, 0)
    assert ep.available


async def test_a_failed_probe_opens_the_circuit_for_another_half_open_time() -> None:
    cb = CircuitBreaker(min_request_count=2, half_open_time=10)
    handler, callee = breaker_on(cb)
    ep = endpoint()
    ctx = FakeCtx(ep)
    await open_it(cb, handler, callee, ctx)
    await trio.sleep(10)
    callee.error = boom
    callee.delay = 2
    assert await outcome(handler, ctx) == "fail"  # the probe
    reopened = trio.current_time()
    assert state(cb) == "open" and not ep.available
    callee.error = None
    await trio.sleep_until(reopened + 9.9)
    assert await outcome(handler, ctx) == "fast"
    await trio.sleep_until(reopened + 10)
    assert await outcome(handler, ctx) == "ok"
    assert state(cb) == "closed" and ep.available


async def test_a_probe_out_longer_than_half_open_time_gives_way_to_another() -> None:
    """Moleculer's anti-stick: a hung probe does not keep the circuit shut for ever; when it
    comes back late, its outcome only counts."""
    cb = CircuitBreaker(min_request_count=2, half_open_time=10)
    handler, callee = breaker_on(cb)
    ctx = FakeCtx(endpoint())
    await open_it(cb, handler, callee, ctx)
    await trio.sleep(10)
    stuck = trio.Event()
    results: list[str] = []
    async with bounded_nursery() as nursery:
        async def hung_probe() -> None:
            callee.release = stuck
            callee.error = boom
            results.append(await outcome(handler, ctx))

        nursery.start_soon(hung_probe)
        await trio.sleep(10)
        assert await outcome(handler, ctx) == "fast"  # out for exactly half_open_time: still its turn
        await trio.sleep(0.5)
        callee.release = None
        callee.error = None
        assert await outcome(handler, ctx) == "ok"  # a new probe: closes
        assert state(cb) == "closed"
        callee.error = boom  # the hung probe fails when it comes back
        stuck.set()
    assert results == ["fail"]
    assert cb.statistics("svc.act", "n2") == CircuitStatistics("closed", 1, 1)


async def test_a_late_probe_failure_only_counts() -> None:
    cb = CircuitBreaker(threshold=0.5, min_request_count=1, half_open_time=10)
    handler, callee = breaker_on(cb)
    ctx = FakeCtx(endpoint())
    await open_it(cb, handler, callee, ctx)
    await trio.sleep(10)
    callee.error = boom
    callee.delay = 12
    assert await outcome(handler, ctx) == "fail"  # came back after half_open_time
    assert cb.statistics("svc.act", "n2") == CircuitStatistics("half_open", 2, 2)


async def test_a_cancelled_probe_lets_the_next_call_probe() -> None:
    cb = CircuitBreaker(min_request_count=2, half_open_time=10)
    handler, callee = breaker_on(cb)
    ctx = FakeCtx(endpoint())
    await open_it(cb, handler, callee, ctx)
    await trio.sleep(10)
    callee.delay = 5
    with trio.move_on_after(1):
        await handler(ctx)
    assert state(cb) == "half_open"
    callee.delay = 0
    assert await outcome(handler, ctx) == "ok"
    assert state(cb) == "closed"


async def test_default_check_counts_5xx_timeouts_and_plain_exceptions_only() -> None:
    cb = CircuitBreaker(threshold=1.0, min_request_count=2)
    handler, callee = breaker_on(cb)
    ctx = FakeCtx(endpoint())
    for error in (lambda: QueueIsFullError("full"), lambda: ValidationError("bad")):
        callee.error = error
        for _ in range(5):
            assert await outcome(handler, ctx) == "fail"
    # Errors the check ignores are not counted at all, not even as calls (as Moleculer).
    assert cb.statistics("svc.act", "n2") == CircuitStatistics("closed", 0, 0)
    callee.error = lambda: RequestTimeoutError("slow")  # 504
    await outcome(handler, ctx)
    assert cb.statistics("svc.act", "n2") == CircuitStatistics("closed", 1, 1)
    callee.error = lambda: KeyError("not a NerveError")
    await outcome(handler, ctx)
    assert state(cb) == "open"


async def test_check_decides_which_errors_count() -> None:
    cb = CircuitBreaker(threshold=1.0, min_request_count=2, check=lambda e: isinstance(e, ValidationError))
    handler, callee = breaker_on(cb)
    ctx = FakeCtx(endpoint())
    callee.error = lambda: RequestTimeoutError("slow")
    for _ in range(5):
        await outcome(handler, ctx)
    assert state(cb) == "closed"
    callee.error = lambda: ValidationError("bad")
    await outcome(handler, ctx)
    await outcome(handler, ctx)
    assert state(cb) == "open"


async def test_errors_from_a_third_node_do_not_count() -> None:
    """A nested call's error relayed by the endpoint says nothing of the endpoint itself."""
    cb = CircuitBreaker(threshold=1.0, min_request_count=1)
    handler, callee = breaker_on(cb)
    ctx = FakeCtx(endpoint("n2"))
    callee.error = lambda: ServerError("deeper", node_id="n3")
    for _ in range(5):
        await outcome(handler, ctx)
    assert state(cb) == "closed"
    for origin in ("n2", HERE, None):
        cb2 = CircuitBreaker(threshold=1.0, min_request_count=1)
        handler2, callee2 = breaker_on(cb2)
        callee2.error = lambda origin=origin: ServerError("here", node_id=origin)
        await outcome(handler2, ctx)
        assert state(cb2) == "open", origin


async def test_counters_restart_every_window_time() -> None:
    cb = CircuitBreaker(threshold=0.5, min_request_count=4, window_time=60)
    handler, callee = breaker_on(cb)
    ctx = FakeCtx(endpoint())
    start = trio.current_time()
    callee.error = boom
    for _ in range(3):
        await outcome(handler, ctx)
    await trio.sleep_until(start + 59.9)
    assert cb.statistics("svc.act", "n2").requests == 3
    await trio.sleep_until(start + 60)
    assert cb.statistics("svc.act", "n2").requests == 0
    await outcome(handler, ctx)  # 4 failures in all, but 1 in this window
    assert state(cb) == "closed"
    for _ in range(3):
        await outcome(handler, ctx)
    assert state(cb) == "open"


async def test_a_window_reset_keeps_an_open_circuit_open() -> None:
    cb = CircuitBreaker(min_request_count=2, window_time=5, half_open_time=30)
    handler, callee = breaker_on(cb)
    ctx = FakeCtx(endpoint())
    await open_it(cb, handler, callee, ctx)
    await trio.sleep(20)  # four windows, no calls
    assert state(cb) == "open"
    assert await outcome(handler, ctx) == "fast"


async def test_an_idle_half_open_circuit_is_forgotten_after_a_window() -> None:
    """Moleculer drops the state of an endpoint that saw no call in a whole window; here the
    circuit is forgotten (closed) once it is half-open and a window went by without calls."""
    cb = CircuitBreaker(threshold=1.0, min_request_count=2, window_time=60, half_open_time=10)
    handler, callee = breaker_on(cb)
    ep = endpoint()
    ctx = FakeCtx(ep)
    await open_it(cb, handler, callee, ctx)
    await trio.sleep(200)
    other = FakeCtx(endpoint("n3"))
    assert await outcome(handler, other) == "ok"  # a call of the action to another node
    assert ep.available
    assert state(cb) == "closed"
    callee.error = boom
    assert await outcome(handler, ctx) == "fail"  # an ordinary call, not a probe
    assert state(cb) == "closed"


async def test_per_action_properties_override_or_turn_it_off() -> None:
    cb = CircuitBreaker(threshold=0.5, min_request_count=20)
    off, callee = breaker_on(cb, circuit_breaker={"enabled": False})
    assert off is callee  # out of the chain
    eager, callee = breaker_on(cb, circuit_breaker={"min_request_count": 1, "threshold": 1.0})
    callee.error = boom
    await outcome(eager, FakeCtx(endpoint()))
    assert state(cb) == "open"

    # A bad property (it may come from another node's INFO) is ignored: the defaults apply.
    cb = CircuitBreaker(threshold=1.0, min_request_count=1)
    bad, callee = breaker_on(cb, circuit_breaker={"threshold": 7})
    callee.error = boom
    await outcome(bad, FakeCtx(endpoint()))
    assert state(cb) == "open"


async def test_serving_side_calls_from_other_nodes_pass_untouched() -> None:
    """local_action: only the calls made on this node have a circuit here; a call served for
    another node is left to that node's own breaker."""
    cb = CircuitBreaker(threshold=1.0, min_request_count=1)
    handler, callee = breaker_on(cb, local=True)
    ep = endpoint(HERE)
    callee.error = boom
    for _ in range(3):
        assert await outcome(handler, FakeCtx(ep, node_id="n9")) == "fail"
    assert state(cb, HERE) == "closed"
    assert await outcome(handler, FakeCtx(ep, node_id=HERE)) == "fail"
    assert state(cb, HERE) == "open" and not ep.available
    assert await outcome(handler, FakeCtx(ep, node_id=HERE)) == "fast"
    assert await outcome(handler, FakeCtx(ep, node_id="n9")) == "fail"  # still served for n9


async def test_a_replaced_endpoint_object_inherits_the_open_circuit() -> None:
    cb = CircuitBreaker(threshold=1.0, min_request_count=1)
    handler, callee = breaker_on(cb)
    callee.error = boom
    await outcome(handler, FakeCtx(endpoint()))
    fresh = endpoint()  # the same action on the same node, as after a new INFO
    assert await outcome(handler, FakeCtx(fresh)) == "fast"
    assert not fresh.available


def test_options_are_checked() -> None:
    for kw in ({"threshold": 0}, {"threshold": 1.5}, {"min_request_count": -1},
               {"min_request_count": 2.5}, {"window_time": 0}, {"half_open_time": -1},
               {"check": "nope"}, {"threshold": math.nan}):
        with pytest.raises(BrokerOptionsError):
            CircuitBreaker(**kw)
    for kw2 in ({"concurrency": 0}, {"max_queue_size": -1}, {"concurrency": True}):
        with pytest.raises(BrokerOptionsError):
            Bulkhead(**kw2)


# --- the breaker against a reference model (hypothesis) -----------------------------------


class CircuitModel:
    """The breaker of one endpoint as docs/middleware.md and the module describe it, for
    calls made one after another."""

    def __init__(self, threshold: float, min_count: int, window: float, half_open: float) -> None:
        self.threshold, self.min_count, self.window, self.half_open = threshold, min_count, window, half_open
        self.state = "closed"
        self.count = self.failures = 0
        self.window_start: float | None = None
        self.changed = 0.0

    def advance(self, t: float) -> None:
        if self.window_start is None:
            return
        due = self.changed + self.half_open
        if (self.state == "open" and t >= due) or (self.state == "half_open_wait" and t > due):
            self.state, self.changed = "half_open", t
        passed = int((t - self.window_start) // self.window)
        if passed > 0:
            if self.state == "half_open" and (passed >= 2 or self.count == 0):
                self.state, self.changed = "closed", t
            self.window_start += passed * self.window
            self.count = self.failures = 0

    def call(self, t: float, result: str, duration: float) -> str:
        if self.window_start is None:
            self.window_start = self.changed = t
        self.advance(t)
        if self.state in ("open", "half_open_wait"):
            return "fast"
        probe = self.state == "half_open"
        if probe:
            self.state, self.changed = "half_open_wait", t
        end = t + duration
        self.advance(end)
        probe = probe and self.state == "half_open_wait"
        if result == "ok":
            self.count += 1
            if probe:
                self.state, self.changed, self.count, self.failures = "closed", end, 0, 0
            else:
                self.check_threshold(end)
        elif result == "fail":
            self.count += 1
            self.failures += 1
            if probe:
                self.state, self.changed = "open", end
            else:
                self.check_threshold(end)
        elif probe:  # an error the check ignores: no verdict
            self.state, self.changed = "half_open", end
        return result

    def check_threshold(self, t: float) -> None:
        if self.state == "closed" and self.count >= self.min_count and self.failures / self.count >= self.threshold:
            self.state, self.changed = "open", t


steps = st.lists(
    st.one_of(
        st.tuples(st.just("call"), st.sampled_from(["ok", "fail", "fail", "fail", "ignored"]),
                  st.sampled_from([0, 0, 1, 2, 4, 12])),
        st.tuples(st.just("sleep"), st.just("-"), st.one_of(st.integers(0, 12), st.sampled_from([30, 60, 150]))),
    ),
    max_size=40,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    threshold=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
    min_count=st.sampled_from([0, 1, 2, 3, 5]),
    window=st.sampled_from([5, 30, 60]),
    half_open=st.sampled_from([0, 3, 10]),
    script=steps,
)
def test_breaker_matches_the_reference_model(threshold: float, min_count: int, window: int,
                                             half_open: int, script: list[tuple[str, str, int]]) -> None:
    async def run() -> None:
        cb = CircuitBreaker(threshold=threshold, min_request_count=min_count, window_time=window,
                            half_open_time=half_open)
        handler, callee = breaker_on(cb)
        ep = endpoint()
        ctx = FakeCtx(ep)
        model = CircuitModel(threshold, min_count, window, half_open)
        for i, (kind, result, amount) in enumerate(script):
            if kind == "sleep":
                await trio.sleep(amount)
            else:
                callee.error = {"ok": None, "fail": boom, "ignored": lambda: ValidationError("bad")}[result]
                callee.delay = amount
                calls = callee.calls
                expected = model.call(trio.current_time(), result, amount)
                got = await outcome(handler, ctx)
                assert (got if got != "fail" else result) == expected, (i, script[: i + 1])
                assert callee.calls == calls + (expected != "fast")
            model.advance(trio.current_time())
            seen = cb.statistics("svc.act", "n2")
            if model.window_start is not None:
                assert (seen.state, seen.requests, seen.failures) == (model.state, model.count, model.failures), \
                    (i, script[: i + 1])
                assert ep.available == (model.state in ("closed", "half_open"))

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))


# --- bulkhead, alone ----------------------------------------------------------------------


@dataclass
class TaggedCtx:
    tag: int
    broker: FakeBroker = field(default_factory=FakeBroker)


def bulkhead_on(bh: Bulkhead, **properties: Any) -> tuple[Any, Callee]:
    callee = Callee()
    return bh.local_action(callee, info(node_id=HERE, **properties)), callee


async def test_bulkhead_runs_concurrency_handlers_and_queues_max_queue_size() -> None:
    bh = Bulkhead(concurrency=3, max_queue_size=2)
    handler, callee = bulkhead_on(bh)
    callee.release = trio.Event()
    results: list[Any] = []

    async def one(tag: int) -> None:
        try:
            results.append(await handler(TaggedCtx(tag)))
        except QueueIsFullError as exc:
            results.append(exc)

    async with bounded_nursery() as nursery:
        for tag in range(5):
            nursery.start_soon(one, tag)
            await trio.sleep(0.01)
        assert callee.running == 3 and bh.statistics("svc.act").queued == 2
        assert bh.statistics("svc.act") == BulkheadStatistics(3, 2, 3, 2)
        with pytest.raises(QueueIsFullError) as full, trio.fail_after(1):
            await handler(TaggedCtx(99))
        assert full.value.code == 429 and full.value.retryable
        assert full.value.data == {"action": "svc.act", "nodeID": HERE}
        callee.release.set()
    assert results == ["ok"] * 5
    assert callee.most == 3 and callee.order[:3] == [0, 1, 2] and sorted(callee.order) == [0, 1, 2, 3, 4]
    assert bh.statistics("svc.act") == BulkheadStatistics(0, 0, 3, 2)


async def test_bulkhead_hands_a_freed_slot_to_the_first_waiter() -> None:
    """No overtaking: a call arriving when a slot frees up queues behind those waiting."""
    bh = Bulkhead(concurrency=1, max_queue_size=10)
    handler, callee = bulkhead_on(bh)
    callee.delay = 1
    async with bounded_nursery() as nursery:
        for tag in range(4):
            nursery.start_soon(handler, TaggedCtx(tag))
            await trio.sleep(0.01)
        await trio.sleep(0.99)  # the first call ends now
        nursery.start_soon(handler, TaggedCtx(9))
    assert callee.order == [0, 1, 2, 3, 9] and callee.most == 1


async def test_max_queue_size_zero_means_no_waiting() -> None:
    bh = Bulkhead(concurrency=1, max_queue_size=0)
    handler, callee = bulkhead_on(bh)
    callee.release = trio.Event()
    async with bounded_nursery() as nursery:
        nursery.start_soon(handler, TaggedCtx(0))
        await trio.sleep(0.01)
        with pytest.raises(QueueIsFullError), trio.fail_after(1):
            await handler(TaggedCtx(1))
        callee.release.set()


async def test_a_cancelled_waiting_call_frees_its_place_in_the_queue() -> None:
    bh = Bulkhead(concurrency=1, max_queue_size=2)
    handler, callee = bulkhead_on(bh)
    callee.release = trio.Event()
    async with bounded_nursery() as nursery:
        nursery.start_soon(handler, TaggedCtx(0))
        await trio.sleep(0.01)
        nursery.start_soon(handler, TaggedCtx(1))
        scope = trio.CancelScope()

        async def doomed() -> None:
            with scope:
                await handler(TaggedCtx(2))

        nursery.start_soon(doomed)
        await trio.sleep(0.01)
        assert bh.statistics("svc.act").queued == 2
        with pytest.raises(QueueIsFullError), trio.fail_after(1):
            await handler(TaggedCtx(3))
        scope.cancel()
        await trio.sleep(0.01)
        assert bh.statistics("svc.act").queued == 1  # its place is free again
        nursery.start_soon(handler, TaggedCtx(4))
        await trio.sleep(0.01)
        callee.release.set()
    assert callee.order == [0, 1, 4]
    assert bh.statistics("svc.act") == BulkheadStatistics(0, 0, 1, 2)


async def test_a_call_cancelled_while_running_releases_its_slot() -> None:
    bh = Bulkhead(concurrency=1, max_queue_size=1)
    handler, callee = bulkhead_on(bh)
    callee.delay = 100
    with trio.move_on_after(1):
        await handler(TaggedCtx(0))
    assert bh.statistics("svc.act").in_flight == 0
    callee.delay = 0
    assert await handler(TaggedCtx(1)) == "ok"


async def test_bulkhead_per_action_override_and_opt_out() -> None:
    bh = Bulkhead(concurrency=5, max_queue_size=5)
    off, callee = bulkhead_on(bh, bulkhead={"enabled": False})
    assert off is callee
    handler, callee = bulkhead_on(bh, bulkhead={"concurrency": 1, "max_queue_size": 1})
    callee.release = trio.Event()
    async with bounded_nursery() as nursery:
        nursery.start_soon(handler, TaggedCtx(0))
        nursery.start_soon(handler, TaggedCtx(1))
        await trio.sleep(0.01)
        with pytest.raises(QueueIsFullError), trio.fail_after(1):
            await handler(TaggedCtx(2))
        callee.release.set()
    for bad in ({"concurrency": 0}, {"max_queue": 3}, "many"):
        with pytest.raises(ServiceSchemaError):
            bulkhead_on(bh, bulkhead=bad)


async def test_bulkhead_bounds_event_handlers_too() -> None:
    bh = Bulkhead(concurrency=2, max_queue_size=1)
    callee = Callee()

    async def on_event(ctx: Any) -> None:
        await callee(ctx)

    handler: Any = bh.local_event(on_event, EventInfo(name="thing.happened", group="svc", service="svc"))
    callee.release = trio.Event()
    async with bounded_nursery() as nursery:
        for tag in range(3):
            nursery.start_soon(handler, TaggedCtx(tag))
        await trio.sleep(0.01)
        assert callee.running == 2
        with pytest.raises(QueueIsFullError) as full, trio.fail_after(1):
            await handler(TaggedCtx(3))
        assert full.value.data == {"event": "thing.happened", "service": "svc", "nodeID": HERE}
        callee.release.set()
    assert callee.most == 2 and callee.calls == 3


# --- through real brokers ----------------------------------------------------------------


class Flaky(nerve.Service):
    """``work`` answers its node's id, or fails with a 500 while ``failing``."""

    name = "flaky"

    def __init__(self, failing: bool = True) -> None:
        self.failing = failing
        self.calls = 0

    @nerve.action
    async def work(self, ctx: nerve.Context) -> str:
        self.calls += 1
        if self.failing:
            raise ServerError(f"down on {self.broker.node_id}")
        return self.broker.node_id


class Touchy(nerve.Service):
    """Per-action breaker settings, as properties that travel to the callers in INFO."""

    name = "touchy"

    def __init__(self) -> None:
        self.calls = 0

    @nerve.action(circuit_breaker={"min_request_count": 1, "threshold": 1.0})
    async def eager(self, ctx: nerve.Context) -> None:
        self.calls += 1
        raise ServerError("no")

    @nerve.action(circuit_breaker={"enabled": False})
    async def exempt(self, ctx: nerve.Context) -> None:
        self.calls += 1
        raise ServerError("no")


async def until_endpoints(broker: nerve.Broker, action: str, n: int) -> None:
    with trio.fail_after(5):
        while len(broker.registry.actions.get(action, [])) < n:
            await trio.sleep(0.01)


async def failures(broker: nerve.Broker, n: int, action: str = "flaky.work", **kw: Any) -> list[str]:
    """Make ``n`` calls; what each ended with: a node id, 'fail' or 'fast'."""
    out = []
    for _ in range(n):
        try:
            out.append(await broker.call(action, **kw))
        except CircuitBreakerOpenError:
            out.append("fast")
        except ServerError:
            out.append("fail")
    return out


async def test_an_open_circuit_fails_fast_without_calling_the_remote_node() -> None:
    flaky = Flaky()
    cb = CircuitBreaker(min_request_count=3, half_open_time=10)
    async with nerve.Broker("cb1-client", middlewares=[cb]) as client, \
            nerve.Broker("cb1-server", services=[flaky]):
        await client.wait_for_services("flaky")
        assert await failures(client, 3) == ["fail"] * 3
        assert cb.statistics("flaky.work", "cb1-server").state == "open"
        assert await failures(client, 5) == ["fast"] * 5
        assert flaky.calls == 3  # not sent
        opened = trio.current_time()

        flaky.failing = False
        await trio.sleep_until(opened + 10)
        assert await failures(client, 3) == ["cb1-server"] * 3  # the probe closed it
        assert cb.statistics("flaky.work", "cb1-server") == CircuitStatistics("closed", 2, 0)


async def test_an_open_endpoint_is_skipped_while_another_node_serves_the_action() -> None:
    bad, good = Flaky(), Flaky(failing=False)
    cb = CircuitBreaker(min_request_count=2, half_open_time=10)
    async with nerve.Broker("cb2-client", middlewares=[cb]) as client, \
            nerve.Broker("cb2-bad", services=[bad]), nerve.Broker("cb2-good", services=[good]):
        await until_endpoints(client, "flaky.work", 2)
        seen = await failures(client, 4)  # round-robin: two each
        assert sorted(seen) == ["cb2-good", "cb2-good", "fail", "fail"]
        assert cb.statistics("flaky.work", "cb2-bad").state == "open"
        opened = trio.current_time()
        assert await failures(client, 10) == ["cb2-good"] * 10
        assert bad.calls == 2

        # Half-open: one probe reaches the bad node, fails, and the circuit opens again.
        await trio.sleep_until(opened + 10)
        seen = await failures(client, 6)
        assert seen.count("fail") == 1 and seen.count("cb2-good") == 5 and bad.calls == 3
        reopened = trio.current_time()

        # Mended: the next probe closes the circuit and both nodes share the calls again.
        bad.failing = False
        await trio.sleep_until(reopened + 10)
        seen = await failures(client, 3)
        assert "cb2-bad" in seen and "fail" not in seen
        assert cb.statistics("flaky.work", "cb2-bad").state == "closed"
        assert sorted(await failures(client, 4)) == ["cb2-bad", "cb2-bad", "cb2-good", "cb2-good"]


async def test_node_id_calls_to_an_open_endpoint_fail_fast_and_a_fallback_answers() -> None:
    bad, good = Flaky(), Flaky(failing=False)
    cb = CircuitBreaker(min_request_count=1, threshold=1.0)
    async with nerve.Broker("cb3-client", middlewares=[cb]) as client, \
            nerve.Broker("cb3-bad", services=[bad]), nerve.Broker("cb3-good", services=[good]):
        await until_endpoints(client, "flaky.work", 2)
        assert await failures(client, 1, node_id="cb3-bad") == ["fail"]
        assert await failures(client, 1, node_id="cb3-bad") == ["fast"]
        errors: list[BaseException] = []

        def spare(ctx: Any, err: BaseException) -> str:
            errors.append(err)
            return "spare"

        assert await client.call("flaky.work", node_id="cb3-bad", fallback=spare) == "spare"
        assert isinstance(errors[0], CircuitBreakerOpenError) and bad.calls == 1
        # Without node_id= the open endpoint is skipped.
        assert await failures(client, 3) == ["cb3-good"] * 3


async def test_a_failing_local_endpoint_gives_way_to_a_remote_one() -> None:
    """local_action, as Moleculer: this node's own calls to its local endpoint have a circuit
    too, so an open local endpoint is skipped in favour of a remote one."""
    local, remote = Flaky(), Flaky(failing=False)
    cb = CircuitBreaker(min_request_count=3)
    async with nerve.Broker("cb4-a", services=[local], middlewares=[cb]) as a, \
            nerve.Broker("cb4-b", services=[remote]):
        await until_endpoints(a, "flaky.work", 2)
        assert await failures(a, 3) == ["fail"] * 3  # local preferred
        assert cb.statistics("flaky.work", "cb4-a").state == "open"
        assert await failures(a, 4) == ["cb4-b"] * 4
        assert local.calls == 3


async def test_the_serving_node_does_not_refuse_other_nodes_calls() -> None:
    served = Flaky()
    cb = CircuitBreaker(min_request_count=1, threshold=1.0)
    async with nerve.Broker("cb5-server", services=[served], middlewares=[cb]), \
            nerve.Broker("cb5-client") as client:
        await client.wait_for_services("flaky")
        assert await failures(client, 5) == ["fail"] * 5
        assert served.calls == 5


class Relay(nerve.Service):
    """``go`` calls ``flaky.work`` on another node and lets its error through."""

    name = "relay"

    def __init__(self) -> None:
        self.calls = 0

    @nerve.action
    async def go(self, ctx: nerve.Context) -> str:
        self.calls += 1
        return await ctx.call("flaky.work")  # type: ignore[no-any-return]


async def test_errors_relayed_from_a_third_node_do_not_open_the_callers_circuit() -> None:
    """a -> b -> c: c fails, then b's circuit to c opens; neither c's error nor b's
    CircuitBreakerOpenError (both about c) counts against b in a's breaker."""
    a_cb = CircuitBreaker(min_request_count=1, threshold=1.0)
    b_cb = CircuitBreaker(min_request_count=1, threshold=1.0)
    relay = Relay()
    async with nerve.Broker("cb8-a", middlewares=[a_cb]) as a, \
            nerve.Broker("cb8-b", services=[relay], middlewares=[b_cb]), \
            nerve.Broker("cb8-c", services=[Flaky()]):
        await a.wait_for_services("relay", "flaky")
        with pytest.raises(ServerError) as first:
            await a.call("relay.go")
        assert first.value.node_id == "cb8-c"
        assert b_cb.statistics("flaky.work", "cb8-c").state == "open"
        for _ in range(3):
            with pytest.raises(CircuitBreakerOpenError) as fast:
                await a.call("relay.go")
            assert fast.value.node_id == "cb8-c"
        assert relay.calls == 4  # a kept calling b
        assert a_cb.statistics("relay.go", "cb8-b") == CircuitStatistics("closed", 0, 0)


async def test_action_properties_set_the_callers_breaker() -> None:
    touchy = Touchy()
    cb = CircuitBreaker()  # min_request_count=20 by default
    async with nerve.Broker("cb6-client", middlewares=[cb]) as client, \
            nerve.Broker("cb6-server", services=[touchy]):
        await client.wait_for_services("touchy")
        assert await failures(client, 3, "touchy.eager") == ["fail", "fast", "fast"]
        assert await failures(client, 30, "touchy.exempt") == ["fail"] * 30
        assert touchy.calls == 31


async def test_timeouts_count_as_failures_end_to_end() -> None:
    class Slow(nerve.Service):
        name = "slow"

        @nerve.action
        async def nap(self, ctx: nerve.Context) -> None:
            await trio.sleep(10)

    cb = CircuitBreaker(min_request_count=2, threshold=1.0)
    async with nerve.Broker("cb7-client", middlewares=[cb]) as client, \
            nerve.Broker("cb7-server", services=[Slow()]):
        await client.wait_for_services("slow")
        for _ in range(2):
            with pytest.raises(RequestTimeoutError):
                await client.call("slow.nap", timeout=1)
        with pytest.raises(CircuitBreakerOpenError):
            await client.call("slow.nap", timeout=1)


class Gate(nerve.Service):
    """``wait`` runs until ``release`` is set; ``narrow`` has its own bulkhead settings."""

    name = "gate"

    def __init__(self) -> None:
        self.release = trio.Event()
        self.running = self.most = self.calls = 0

    async def _hold(self) -> str:
        self.calls += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return "done"

    @nerve.action
    async def wait(self, ctx: nerve.Context) -> str:
        return await self._hold()

    @nerve.action(bulkhead={"concurrency": 1, "max_queue_size": 0})
    async def narrow(self, ctx: nerve.Context) -> str:
        return await self._hold()


def caller_of(client: nerve.Broker, action: str, **kw: Any) -> tuple[list[Any], Callable[[], Any]]:
    """A task that calls ``action`` and puts what it got (result or NerveError) in the list."""
    results: list[Any] = []

    async def one() -> None:
        try:
            results.append(await client.call(action, **kw))
        except NerveError as exc:
            results.append(exc)

    return results, one


async def test_bulkhead_limits_a_served_action_for_remote_callers() -> None:
    gate = Gate()
    bh = Bulkhead(concurrency=2, max_queue_size=3)
    async with nerve.Broker("bh1-server", services=[gate], middlewares=[bh]), \
            nerve.Broker("bh1-client") as client:
        await client.wait_for_services("gate")
        results, one = caller_of(client, "gate.wait")
        async with bounded_nursery() as nursery:
            for _ in range(7):
                nursery.start_soon(one)
            with trio.fail_after(5):
                while len(results) < 2:
                    await trio.sleep(0.01)
            assert gate.running == 2 and bh.statistics("gate.wait").queued == 3
            full = [r for r in results if isinstance(r, QueueIsFullError)]
            assert len(full) == 2 and all(e.code == 429 and e.retryable for e in full)
            gate.release.set()
        assert results.count("done") == 5 and gate.most == 2 and gate.calls == 5


async def test_bulkhead_per_action_property() -> None:
    gate = Gate()
    async with nerve.Broker("bh2", services=[gate], middlewares=[Bulkhead()]) as broker:
        results, one = caller_of(broker, "gate.narrow")
        async with bounded_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
            with trio.fail_after(5):
                while len(results) < 2:
                    await trio.sleep(0.01)
            assert [type(r) for r in results] == [QueueIsFullError, QueueIsFullError]
            gate.release.set()
        assert results[2] == "done" and gate.most == 1


async def test_a_remote_call_that_times_out_in_the_queue_frees_its_place() -> None:
    gate = Gate()
    bh = Bulkhead(concurrency=1, max_queue_size=1)
    async with nerve.Broker("bh3-server", services=[gate], middlewares=[bh]), \
            nerve.Broker("bh3-client") as client:
        await client.wait_for_services("gate")
        async with bounded_nursery() as nursery:
            nursery.start_soon(client.call, "gate.wait")
            with trio.fail_after(5):
                while gate.running < 1:
                    await trio.sleep(0.01)
            with pytest.raises(RequestTimeoutError):
                await client.call("gate.wait", timeout=2)  # waits in the queue, then gives up
            with trio.fail_after(5):
                while bh.statistics("gate.wait").queued:
                    await trio.sleep(0.01)
            results, one = caller_of(client, "gate.wait")
            nursery.start_soon(one)  # takes the freed place
            with trio.fail_after(5):
                while bh.statistics("gate.wait").queued < 1:
                    await trio.sleep(0.01)
            gate.release.set()
        assert results == ["done"] and gate.calls == 2


class Recommends(nerve.Service):
    """Moleculer's docs example: action-level fallbacks, answered on the serving node."""

    name = "recommends"

    def __init__(self) -> None:
        self.fallbacks: list[tuple[str, str]] = []

    @nerve.action(fallback="cached")
    async def by_name(self, ctx: nerve.Context) -> str:
        raise ServerError("recommender down")

    @nerve.action(fallback=lambda ctx, err: f"lambda saw {type(err).__name__}")
    async def by_callable(self, ctx: nerve.Context) -> str:
        raise KeyError("nope")

    @nerve.action(fallback="cached")
    async def fine(self, ctx: nerve.Context) -> str:
        return "fresh"

    async def cached(self, ctx: nerve.Context, err: BaseException) -> str:
        self.fallbacks.append((self.broker.node_id, type(err).__name__))
        return "cached"


async def test_call_level_fallback_value_and_callables() -> None:
    async with nerve.Broker("fb1-client") as client, nerve.Broker("fb1-server", services=[Flaky()]):
        await client.wait_for_services("flaky")
        assert await client.call("flaky.work", fallback="spare") == "spare"
        assert await client.call("flaky.work", fallback=0) == 0  # a falsy value is a value
        seen: list[tuple[Any, BaseException]] = []

        def sync_fallback(ctx: Any, err: BaseException) -> str:
            seen.append((ctx, err))
            return "sync"

        async def async_fallback(ctx: Any, err: BaseException) -> str:
            await trio.sleep(0)
            seen.append((ctx, err))
            return "async"

        assert await client.call("flaky.work", fallback=sync_fallback) == "sync"
        assert await client.call("flaky.work", fallback=async_fallback) == "async"
        assert [type(err) for _, err in seen] == [ServerError, ServerError]
        assert all(ctx is None for ctx, _ in seen)  # broker.call: no calling context
        assert "down on fb1-server" in str(seen[0][1])

        # Any final error: no such action either.
        assert await client.call("nobody.home", fallback=async_fallback) == "async"
        assert isinstance(seen[-1][1], nerve.errors.ServiceNotFoundError)


async def test_call_level_fallback_is_not_used_on_success() -> None:
    async with nerve.Broker("fb2", services=[Flaky(failing=False)]) as broker:
        assert await broker.call("flaky.work", fallback=lambda ctx, err: "spare") == "fb2"


async def test_action_level_fallback_answers_on_the_serving_node() -> None:
    rec = Recommends()
    async with nerve.Broker("fb3-client") as client, nerve.Broker("fb3-server", services=[rec]):
        await client.wait_for_services("recommends")
        assert await client.call("recommends.by_name") == "cached"
        assert rec.fallbacks == [("fb3-server", "ServerError")]
        assert await client.call("recommends.by_callable") == "lambda saw KeyError"
        assert await client.call("recommends.fine") == "fresh"
        assert rec.fallbacks == [("fb3-server", "ServerError")]


async def test_an_unknown_fallback_method_is_refused() -> None:
    class Broken(nerve.Service):
        name = "broken"

        @nerve.action(fallback="no_such_method")
        async def go(self, ctx: nerve.Context) -> None: ...

    with pytest.raises(ServiceSchemaError):
        async with nerve.Broker("fb4", services=[Broken()]):
            pass


@pytest.mark.parametrize("anyio_backend", ["trio"])  # real time: sockets under a mock clock would jump it
async def test_on_tcp_an_open_endpoint_is_skipped_then_probed_and_closed(anyio_backend: str) -> None:
    bad, good = Flaky(), Flaky(failing=False)
    cb = CircuitBreaker(min_request_count=2, half_open_time=0.5)
    tcp = "tcp://127.0.0.1:0"
    async with nerve.Broker("cbt-bad", transport=tcp, services=[bad]) as b:
        assert b.address is not None
        async with nerve.Broker("cbt-good", transport=tcp, peers=[b.address], services=[good]), \
                nerve.Broker("cbt-client", transport=tcp, peers=[b.address], middlewares=[cb]) as client:
            await until_endpoints(client, "flaky.work", 2)
            with trio.fail_after(10):
                while cb.statistics("flaky.work", "cbt-bad").state != "open":
                    await failures(client, 1)
            opened = trio.current_time()
            calls = bad.calls
            assert await failures(client, 20) == ["cbt-good"] * 20
            assert bad.calls == calls
            bad.failing = False
            await trio.sleep_until(opened + 0.5)
            seen = await failures(client, 3)
            assert "cbt-bad" in seen and "fail" not in seen
            assert cb.statistics("flaky.work", "cbt-bad").state == "closed"
            assert sorted(await failures(client, 4)) == ["cbt-bad", "cbt-bad", "cbt-good", "cbt-good"]


async def test_an_open_endpoint_whose_node_sends_a_new_info_is_probed_again_after_half_open_time() -> None:
    """The registry keeps the endpoint object of an action its node describes as before, so the
    breaker's half-open move reaches the endpoint that selection sees."""
    from nerve.errors import NerveError as _NerveError

    failing = {"ft-info-b": True}
    served: list[str] = []

    def work(node: str) -> nerve.Service:
        class Work(nerve.Service):
            name = "ftinfo"

            @nerve.action
            async def do(self, ctx: nerve.Context) -> str:
                served.append(node)
                if failing.get(node):
                    raise _NerveError("boom", code=500)
                return node

        return Work()

    class Extra(nerve.Service):
        name = "ftinfo_extra"

        @nerve.action
        async def x(self, ctx: nerve.Context) -> int:
            return 1

    cb = CircuitBreaker(threshold=0.5, min_request_count=2, window_time=1.0, half_open_time=0.3)
    async with nerve.Broker("ft-info-a", middlewares=[cb]) as a, \
            nerve.Broker("ft-info-b", services=[work("ft-info-b")]) as b, \
            nerve.Broker("ft-info-c", services=[work("ft-info-c")]):
        with trio.fail_after(5):
            while len(a.registry.actions.get("ftinfo.do", [])) < 2:
                await trio.sleep(0.01)
        for _ in range(3):
            with pytest.raises(_NerveError):
                await a.call("ftinfo.do", node_id="ft-info-b")
        assert cb.statistics("ftinfo.do", "ft-info-b").state == "open"
        failing["ft-info-b"] = False
        b.add_service(Extra())  # a new INFO from b while its circuit is open
        await a.wait_for_services("ftinfo_extra", timeout=5)
        served.clear()
        end = trio.current_time() + 1.5
        while trio.current_time() < end:
            await a.call("ftinfo.do")
            await trio.sleep(0.01)
        assert served.count("ft-info-b") > 0, served[:10]
        assert cb.statistics("ftinfo.do", "ft-info-b").state == "closed"
