"""DESIGN section 3, retries and node_id: only retryable errors are retried, with exponential
backoff, preferring another node; ``retries=N`` bounds the attempts to N+1; ``node_id=``
targets exactly that node."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import nerve
from nerve.errors import (
    ClientError,
    RequestRejectedError,
    RetryableError,
    ServiceNotFoundError,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Virtual time: backoff delays are exact whatever the machine's load."""
    import trio.testing

    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


class Flaky(nerve.Service):
    """``work`` fails with ``error`` (a factory) while ``failing`` is true, else answers."""

    name = "flaky"

    def __init__(self, log: list[tuple[str, float]], failing: bool, error: Any = None) -> None:
        self.log = log
        self.failing = failing
        self.error = error or (lambda node: RequestRejectedError(f"rejected by {node}"))

    @nerve.action
    async def work(self, ctx: nerve.Context) -> str:
        node = self.broker.node_id
        self.log.append((node, trio.current_time()))
        if self.failing:
            raise self.error(node)
        return node


class FirstNamedStrategy:
    """Always the endpoint on the node named ``first`` if it is a candidate: without the
    retry preferring another node, every retry would go back there."""

    def __init__(self, first: str) -> None:
        self.first = first

    def select(self, key: str, endpoints: list[Any], ctx: Any) -> Any:
        for ep in endpoints:
            if ep.node_id == self.first:
                return ep
        return endpoints[0]


@pytest.mark.parametrize(
    "error",
    [
        lambda node: RequestRejectedError(f"rejected by {node}"),
        lambda node: RetryableError(f"try again, says {node}"),
    ],
    ids=["RequestRejectedError", "RetryableError"],
)
async def test_retryable_error_is_retried_on_another_node(error: Any) -> None:
    log: list[tuple[str, float]] = []
    async with nerve.Broker("rt-client", strategy=FirstNamedStrategy("rt-bad"), retry_delay=0.01) as client, \
            nerve.Broker("rt-bad", services=[Flaky(log, True, error)]), \
            nerve.Broker("rt-good", services=[Flaky(log, False)]):
        await client.wait_for_services("flaky")
        with trio.fail_after(5):
            while len(client.registry.actions.get("flaky.work", [])) < 2:
                await trio.sleep(0.01)
        for i in range(5):
            del log[:]
            assert await client.call("flaky.work", retries=1) == "rt-good"
            assert [node for node, _ in log] == ["rt-bad", "rt-good"], i


async def test_without_retries_the_retryable_error_reaches_the_caller() -> None:
    log: list[tuple[str, float]] = []
    async with nerve.Broker("rt0-client", strategy=FirstNamedStrategy("rt0-bad")) as client, \
            nerve.Broker("rt0-bad", services=[Flaky(log, True)]), \
            nerve.Broker("rt0-good", services=[Flaky(log, False)]):
        await client.wait_for_services("flaky")
        with trio.fail_after(5):
            while len(client.registry.actions.get("flaky.work", [])) < 2:
                await trio.sleep(0.01)
        with pytest.raises(RequestRejectedError) as info:
            await client.call("flaky.work")  # the broker's default: retries=0
        assert info.value.node_id == "rt0-bad"
        assert [node for node, _ in log] == ["rt0-bad"]


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
async def test_non_retryable_errors_are_not_retried(remote: bool) -> None:
    log: list[tuple[str, float]] = []
    svc = Flaky(log, True, lambda node: ClientError("no", 400, "NOPE"))
    async with nerve.Broker("rn-client", services=[] if remote else [svc], retry_delay=0.01) as client, \
            nerve.Broker("rn-server", services=[svc] if remote else []):
        await client.wait_for_services("flaky")
        with pytest.raises(ClientError):
            await client.call("flaky.work", retries=3)
        assert len(log) == 1

        # A plain exception is not retryable either.
        svc.error = lambda node: KeyError("boom")
        with pytest.raises((KeyError, nerve.errors.RemoteError)):  # local: as raised; remote: by name
            await client.call("flaky.work", retries=3)
        assert len(log) == 2


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
@pytest.mark.parametrize("n", [0, 1, 3])
async def test_retries_bound_attempts(remote: bool, n: int) -> None:
    log: list[tuple[str, float]] = []
    svc = Flaky(log, True, lambda node: RetryableError("again"))
    async with nerve.Broker("rb-client", services=[] if remote else [svc], retry_delay=0.005,
                            retry_max_delay=0.01) as client, \
            nerve.Broker("rb-server", services=[svc] if remote else []):
        await client.wait_for_services("flaky")
        with pytest.raises(RetryableError):
            await client.call("flaky.work", retries=n)
        assert len(log) == n + 1

        # The broker-wide default applies when the call does not say.
        del log[:]
        client.retries = 2
        with pytest.raises(RetryableError):
            await client.call("flaky.work")
        assert len(log) == 3


async def test_retry_eventually_succeeds_on_the_same_single_node() -> None:
    log: list[tuple[str, float]] = []

    class Recovering(Flaky):
        @nerve.action
        async def work(self, ctx: nerve.Context) -> str:
            self.log.append((self.broker.node_id, trio.current_time()))
            if len(self.log) < 3:
                raise RetryableError("not yet")
            return "finally"

    async with nerve.Broker("rs-client", retry_delay=0.01) as client, \
            nerve.Broker("rs-server", services=[Recovering(log, False)]):
        await client.wait_for_services("flaky")
        assert await client.call("flaky.work", retries=5) == "finally"
        assert len(log) == 3


async def test_backoff_delays_grow_exponentially() -> None:
    log: list[tuple[str, float]] = []
    delay = 0.05
    async with nerve.Broker("rd-client", retry_delay=delay, retry_factor=2.0, retry_max_delay=10.0) as client, \
            nerve.Broker("rd-server", services=[Flaky(log, True, lambda n: RetryableError("again"))]):
        await client.wait_for_services("flaky")
        with pytest.raises(RetryableError):
            await client.call("flaky.work", retries=3)
    times = [t for _, t in log]
    assert len(times) == 4
    gaps = [b - a for a, b in zip(times, times[1:])]
    for i, gap in enumerate(gaps):
        expected = delay * 2 ** i  # 0.05, 0.1, 0.2
        assert expected * 0.95 <= gap < expected * 1.5 + 0.03, (i, gaps)
    assert gaps[0] < gaps[1] < gaps[2]


async def test_backoff_is_capped_by_retry_max_delay() -> None:
    log: list[tuple[str, float]] = []
    async with nerve.Broker("rc-client", retry_delay=0.03, retry_factor=4.0, retry_max_delay=0.05) as client, \
            nerve.Broker("rc-server", services=[Flaky(log, True, lambda n: RetryableError("again"))]):
        await client.wait_for_services("flaky")
        with pytest.raises(RetryableError):
            await client.call("flaky.work", retries=3)
    times = [t for _, t in log]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert 0.028 <= gaps[0] < 0.1, gaps
    assert 0.048 <= gaps[1] < 0.11, gaps  # 0.12 capped to 0.05
    assert 0.048 <= gaps[2] < 0.2, gaps  # 0.48 capped to 0.05


async def test_node_id_targets_exactly_that_node() -> None:
    log: list[tuple[str, float]] = []
    async with nerve.Broker("ri-client", retry_delay=0.005) as client, \
            nerve.Broker("ri-a", services=[Flaky(log, False)]), \
            nerve.Broker("ri-b", services=[Flaky(log, False)]):
        await client.wait_for_services("flaky")
        with trio.fail_after(5):
            while len(client.registry.actions.get("flaky.work", [])) < 2:
                await trio.sleep(0.01)
        for target in ["ri-b", "ri-a", "ri-b", "ri-b", "ri-a"]:
            assert await client.call("flaky.work", node_id=target) == target
        assert [n for n, _ in log] == ["ri-b", "ri-a", "ri-b", "ri-b", "ri-a"]
        # Without node_id the default round-robin spreads the calls over both nodes.
        del log[:]
        for _ in range(4):
            await client.call("flaky.work")
        assert sorted(n for n, _ in log) == ["ri-a", "ri-a", "ri-b", "ri-b"]


async def test_node_id_retries_stay_on_that_node() -> None:
    log: list[tuple[str, float]] = []
    async with nerve.Broker("rj-client", retry_delay=0.005) as client, \
            nerve.Broker("rj-bad", services=[Flaky(log, True)]), \
            nerve.Broker("rj-good", services=[Flaky(log, False)]):
        await client.wait_for_services("flaky")
        with trio.fail_after(5):
            while len(client.registry.actions.get("flaky.work", [])) < 2:
                await trio.sleep(0.01)
        with pytest.raises(RequestRejectedError):
            await client.call("flaky.work", node_id="rj-bad", retries=2)
        assert [n for n, _ in log] == ["rj-bad"] * 3


async def test_node_id_without_the_action_is_not_found_and_not_sent() -> None:
    log: list[tuple[str, float]] = []
    async with nerve.Broker("rk-client", retry_delay=0.005) as client, \
            nerve.Broker("rk-a", services=[Flaky(log, False)]), \
            nerve.Broker("rk-other") as other:
        await client.wait_for_services("flaky")
        with pytest.raises(ServiceNotFoundError) as info:
            await client.call("flaky.work", node_id="rk-other")
        assert "rk-other" in info.value.message
        assert other.transit.requests_received == 0
        assert log == []


async def test_a_call_whose_request_stream_was_partly_sent_is_never_retried() -> None:
    log: list[tuple[str, float]] = []

    class Reader(nerve.Service):
        name = "reader"

        @nerve.action
        async def eat(self, ctx: nerve.Context) -> str:
            log.append((self.broker.node_id, trio.current_time()))
            assert ctx.stream is not None
            await ctx.stream.receive()  # take part of the stream, then fail retryably
            raise RequestRejectedError("gave up midway")

    async with nerve.Broker("rst-client", retry_delay=0.005) as client, \
            nerve.Broker("rst-a", services=[Reader()]), nerve.Broker("rst-b", services=[Reader()]):
        await client.wait_for_services("reader")
        with trio.fail_after(5):
            while len(client.registry.actions.get("reader.eat", [])) < 2:
                await trio.sleep(0.01)

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(20):
                yield b"c" * 10_000

        stream = nerve.PacketStream.from_iterable(chunks())
        with trio.fail_after(5), pytest.raises(RequestRejectedError):
            await client.call("reader.eat", stream=stream, retries=3)
        assert len(log) == 1
