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
