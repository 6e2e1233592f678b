"""The middlewares' stream hooks: every chunk of a call's streams, request and response, is
told to ``stream_sent`` on the node that produces it and ``stream_received`` on the node that
reads it, with the call's context where there is one."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import nerve

pytestmark = pytest.mark.anyio

CHUNK = 4096
COUNT = 16


class Counting(nerve.Middleware):
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.actions: set[str | None] = set()

    def stream_sent(self, ctx: Any, stream: Any, nbytes: int) -> None:
        self.sent += nbytes
        if ctx is not None:
            self.actions.add(ctx.action)

    def stream_received(self, ctx: Any, stream: Any, nbytes: int) -> None:
        self.received += nbytes
        if ctx is not None:
            self.actions.add(ctx.action)


class Files(nerve.Service):
    name = "files"

    @nerve.action
    async def upload(self, ctx: nerve.Context) -> int:
        total = 0
        assert ctx.stream is not None
        async for chunk in ctx.stream:
            total += len(chunk)
        return total

    @nerve.action
    async def download(self, ctx: nerve.Context) -> nerve.PacketStream:
        async def gen() -> Any:
            for _ in range(COUNT):
                yield b"d" * CHUNK

        return nerve.PacketStream.from_iterable(gen())


async def _gen() -> Any:
    for _ in range(COUNT):
        yield b"u" * CHUNK


@pytest.mark.parametrize("where", ["same-node", "tcp"])
async def test_stream_hooks_count_every_chunk_both_ways(where: str) -> None:
    srv_mw, cli_mw = Counting(), Counting()
    total = CHUNK * COUNT
    if where == "same-node":
        async with nerve.Broker("one", services=[Files()], middlewares=[srv_mw]) as b:
            assert await b.call("files.upload", stream=nerve.PacketStream.from_iterable(_gen())) == total
            got = b"".join([c async for c in await b.call("files.download")])
            assert len(got) == total
        # one node produces and reads both streams
        assert srv_mw.sent == 2 * total and srv_mw.received == 2 * total
        assert srv_mw.actions == {"files.upload", "files.download"}
        return
    async with nerve.Broker("srv", transport="tcp://127.0.0.1:0", services=[Files()], middlewares=[srv_mw]) as srv:
        async with nerve.Broker("cli", transport="tcp://127.0.0.1:0", peers=[srv.address],
                                middlewares=[cli_mw]) as cli:
            await cli.wait_for_services("files")
            assert await cli.call("files.upload", stream=nerve.PacketStream.from_iterable(_gen())) == total
            got = b"".join([c async for c in await cli.call("files.download")])
            assert len(got) == total
            with trio.fail_after(2):
                while srv_mw.sent < total:
                    await trio.sleep(0.01)
    assert cli_mw.sent == total and cli_mw.received == total  # upload out, download in
    assert srv_mw.sent == total and srv_mw.received == total  # download out, upload in
    assert srv_mw.actions == {"files.upload", "files.download"}


async def test_no_stream_hook_no_observer() -> None:
    """A broker whose middlewares do not watch streams leaves streams unobserved."""

    class Other(nerve.Middleware):
        def call(self, next: Any) -> Any:
            return next

    async with nerve.Broker("one", services=[Files()], middlewares=[Other()]) as b:
        reader = await b.call("files.download")
        assert reader._on_received is None  # noqa: SLF001 - the observer slot itself
        async for _ in reader:
            pass
