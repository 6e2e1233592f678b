"""The handler pool that serves remote requests: no leaks of context variables between
requests, no head-of-line blocking behind a slow handler, and a drain on graceful stop."""

from __future__ import annotations

import contextvars

import pytest
import trio

import nerve

pytestmark = pytest.mark.anyio

request_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_var", default="unset")


class Probe(nerve.Service):
    name = "probe"

    def __init__(self) -> None:
        self.release = trio.Event()
        self.seen_before_set: list[str] = []

    @nerve.action
    async def tag(self, ctx: nerve.Context) -> str:
        self.seen_before_set.append(request_var.get())
        request_var.set(str(ctx.params))
        await trio.lowlevel.checkpoint()
        return request_var.get()

    @nerve.action
    async def slow(self, ctx: nerve.Context) -> str:
        await self.release.wait()
        return "slow"

    @nerve.action
    async def quick(self, ctx: nerve.Context) -> str:
        return "quick"

    @nerve.action
    async def nap(self, ctx: nerve.Context) -> float:
        """Sleeps ``params`` seconds; returns the budget it saw."""
        budget = trio.current_effective_deadline() - trio.current_time()
        await trio.sleep(float(ctx.params))
        return budget

    @nerve.action
    async def stubborn(self, ctx: nerve.Context) -> str:
        """Swallows its cancellation (a badly written handler) and answers anyway."""
        try:
            await trio.sleep(float(ctx.params))
        except trio.Cancelled:
            return "swallowed"
        return "slept"


@pytest.mark.parametrize("transport", ["local", "tcp"])
async def test_context_variables_do_not_leak_between_requests(transport: str) -> None:
    probe = Probe()
    kw = {"transport": "tcp://127.0.0.1:0"} if transport == "tcp" else {}
    async with nerve.Broker("dp-server", services=[probe], **kw) as server:
        peer = {"peers": [server.address]} if transport == "tcp" else {}
        async with nerve.Broker("dp-client", **kw, **peer) as client:
            await client.wait_for_services("probe")
            results: list[str] = []

            async def one(i: int) -> None:
                results.append(await client.call("probe.tag", i))

            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(one, i)
            assert sorted(results, key=int) == [str(i) for i in range(50)]
            assert probe.seen_before_set == ["unset"] * 50


@pytest.mark.parametrize("transport", ["local", "tcp"])
async def test_a_blocked_handler_does_not_hold_up_the_others(transport: str) -> None:
    probe = Probe()
    kw = {"transport": "tcp://127.0.0.1:0"} if transport == "tcp" else {}
    async with nerve.Broker("hol-server", services=[probe], **kw) as server:
        peer = {"peers": [server.address]} if transport == "tcp" else {}
        async with nerve.Broker("hol-client", **kw, **peer) as client:
            await client.wait_for_services("probe")
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(client.call, "probe.slow")
                await trio.sleep(0.05)
                with trio.fail_after(2):
                    for _ in range(100):
                        assert await client.call("probe.quick") == "quick"
                assert server._handlers.active == 10  # the slow ones, still parked
                probe.release.set()
            assert server._handlers.active == 0


async def test_graceful_stop_drains_running_handlers() -> None:
    probe = Probe()
    results: list[str] = []
    async with nerve.Broker("drain-client") as client:
        async with trio.open_nursery() as nursery:
            async with nerve.Broker("drain-server", services=[probe]):
                await client.wait_for_services("probe")

                async def call_slow() -> None:
                    results.append(await client.call("probe.slow"))

                async def release_later() -> None:
                    await trio.sleep(0.2)
                    probe.release.set()

                nursery.start_soon(call_slow)
                await trio.sleep(0.05)
                nursery.start_soon(release_later)
            # Leaving the block stopped the server: it waited for the slow handler to answer.
            assert results == ["slow"]


async def _raw_call(client: nerve.Broker, action: str, params: object, budget: float) -> object:
    """Send a REQ carrying ``budget`` and wait for whatever the callee answers, with no timer of
    our own: what comes back is the callee's doing."""
    ep = client.registry.select_action(action)
    call_id = client._next_id()
    pending = client.transit.send_request(ep, call_id, params, {}, {}, 1, call_id, None, None,
                                          timeout=budget)
    try:
        with trio.fail_after(5):
            await pending.wait()
    finally:
        del client.transit.pending[call_id]
    if pending.error is not None:
        raise pending.error
    return pending.result


@pytest.mark.parametrize("transport", ["local", "tcp"])
async def test_budgets_cut_handlers_and_the_workers_go_on(transport: str) -> None:
    """Requests with budgets run under them on the pool's workers: one that outlives its budget
    is cut and the callee answers RequestTimeoutError; a handler that swallows the cancellation
    still answers; and afterwards the same workers serve calls with and without budgets, with
    no stale deadline left on them."""
    from nerve.errors import RequestTimeoutError

    probe = Probe()
    kw = {"transport": "tcp://127.0.0.1:0"} if transport == "tcp" else {}
    async with nerve.Broker("dp-server", services=[probe], **kw) as server:
        peer = {"peers": [server.address]} if transport == "tcp" else {}
        async with nerve.Broker("dp-client", **kw, **peer) as client:
            await client.wait_for_services("probe")
            outcomes: dict[str, list[object]] = {"cut": [], "ok": [], "stubborn": []}

            async def cut() -> None:
                try:
                    await _raw_call(client, "probe.nap", 5.0, budget=0.1)
                except RequestTimeoutError as exc:
                    outcomes["cut"].append(exc.node_id)

            async def ok() -> None:
                outcomes["ok"].append(await _raw_call(client, "probe.nap", 0.01, budget=2.0))

            async def stubborn() -> None:
                outcomes["stubborn"].append(await _raw_call(client, "probe.stubborn", 5.0, budget=0.1))

            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(cut)
                    nursery.start_soon(ok)
                nursery.start_soon(stubborn)
            assert trio.current_time() - t0 < 2.0
            assert outcomes["cut"] == ["dp-server"] * 20
            assert outcomes["stubborn"] == ["swallowed"]
            budgets = outcomes["ok"]
            assert len(budgets) == 20 and all(1.5 < b <= 2.0 + 1e-3 for b in budgets)  # type: ignore[operator]
            # The workers that were cut (and the one whose scope fired) serve on, under no
            # leftover deadline: each call sees only the budget of this fail_after (5 s).
            with trio.fail_after(5):
                for _ in range(30):
                    assert await client.call("probe.quick") == "quick"
                assert 4.5 < await client.call("probe.nap", 0.3) <= 5.0 + 1e-3
                assert await client.call("probe.stubborn", 0.2) == "slept"
