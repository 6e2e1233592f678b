"""Stream timeouts and cancellation: the idle timeout bounds gaps between chunks, the call
timeout bounds only the wait for the first response, and cancellation travels both ways."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import nerve
from nerve.errors import RequestTimeoutError, StreamClosedError, StreamError, StreamIdleTimeoutError

pytestmark = pytest.mark.anyio

CHUNK = 16 * 1024
WINDOW = 64 * 1024


class Slow(nerve.Service):
    name = "slow"

    def __init__(self) -> None:
        self.handler_outcome: str | None = None
        self.handler_done = trio.Event()

    @nerve.action
    async def stall_after_first(self, ctx: nerve.Context) -> nerve.PacketStream:
        async def chunks() -> Any:
            yield b"x" * CHUNK
            await trio.sleep_forever()

        return nerve.PacketStream.from_iterable(chunks())

    @nerve.action
    async def late(self, ctx: nerve.Context) -> nerve.PacketStream:
        await trio.sleep(5)
        return nerve.PacketStream.from_iterable(_nothing())

    @nerve.action
    async def read_slowly(self, ctx: nerve.Context) -> int:
        assert ctx.stream is not None
        n = 0
        try:
            async for chunk in ctx.stream:
                n += len(chunk)
                await trio.sleep(0.02)
        except trio.Cancelled:
            self.handler_outcome = "cancelled"
            raise
        except StreamError as exc:
            self.handler_outcome = type(exc).__name__
            raise
        finally:
            self.handler_done.set()
        self.handler_outcome = "completed"
        return n

    @nerve.action
    async def never_reads(self, ctx: nerve.Context) -> str:
        await trio.sleep(10)
        return "late"


async def _nothing() -> Any:
    if False:  # pragma: no cover - an empty async generator
        yield b""


def brokers(remote_idle: float = 30.0, local_idle: float = 0.3) -> tuple[nerve.Broker, nerve.Broker, Slow]:
    slow = Slow()
    kw = {"max_chunk": CHUNK, "stream_window": WINDOW}
    server = nerve.Broker("to-server", services=[slow], stream_idle_timeout=remote_idle, **kw)
    client = nerve.Broker("to-client", stream_idle_timeout=local_idle, **kw)
    return client, server, slow


async def test_reader_idle_timeout_when_the_producer_stalls() -> None:
    client, server, _ = brokers()
    async with client, server:
        await client.wait_for_services("slow")
        stream = await client.call("slow.stall_after_first")
        assert await stream.receive() == b"x" * CHUNK
        start = trio.current_time()
        with trio.fail_after(5):
            with pytest.raises(StreamIdleTimeoutError):
                await stream.receive()
        assert 0.25 <= trio.current_time() - start < 2.0
        # The producer was told and its stalled source cancelled: nothing keeps running there.
        with trio.fail_after(2):
            while server._handlers.active:
                await trio.sleep(0.01)


async def test_producer_idle_timeout_when_the_reader_never_reads() -> None:
    client, server, _ = brokers()
    async with client, server:
        await client.wait_for_services("slow")
        stream = client.create_stream(idle_timeout=0.3)

        async def produce() -> None:
            with pytest.raises(StreamIdleTimeoutError):
                for _ in range(100):  # far more than one window
                    await stream.send(b"y" * CHUNK)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                with pytest.raises(StreamError):
                    await client.call("slow.never_reads", stream=stream)
        assert stream.statistics().bytes_sent <= WINDOW + CHUNK


async def test_call_timeout_never_kills_a_long_upload() -> None:
    """The upload takes ~1 s; the call timeout is 0.3 s: it bounds the wait for the response
    once the request stream has ended, not the transfer."""
    client, server, slow = brokers(local_idle=5.0)
    async with client, server:
        await client.wait_for_services("slow")
        data = b"z" * (50 * CHUNK)
        with trio.fail_after(20):
            n = await client.call("slow.read_slowly", timeout=0.3,
                                  stream=nerve.PacketStream.from_iterable(_pieces(data)))
        assert n == len(data)
        assert slow.handler_outcome == "completed"


async def _pieces(data: bytes) -> Any:
    for at in range(0, len(data), CHUNK):
        yield data[at:at + CHUNK]


async def test_call_timeout_bounds_the_wait_for_a_response_stream() -> None:
    client, server, _ = brokers()
    async with client, server:
        await client.wait_for_services("slow")
        start = trio.current_time()
        with pytest.raises(RequestTimeoutError):
            await client.call("slow.late", timeout=0.2)
        assert trio.current_time() - start < 1.0


@pytest.mark.parametrize("transport", ["local", "tcp"])
async def test_caller_cancelled_mid_upload_cancels_the_handler(transport: str) -> None:
    slow = Slow()
    kw: dict[str, Any] = {"max_chunk": CHUNK, "stream_window": WINDOW}
    if transport == "tcp":
        server = nerve.Broker("cx-server", transport="tcp://127.0.0.1:0", services=[slow], **kw)
        async with server:
            async with nerve.Broker("cx-client", transport="tcp://127.0.0.1:0", peers=[server.address], **kw) as c:
                await _cancel_mid_upload(c, slow)
    else:
        async with nerve.Broker("cx-server", services=[slow], **kw), nerve.Broker("cx-client", **kw) as c:
            await _cancel_mid_upload(c, slow)


async def _cancel_mid_upload(client: nerve.Broker, slow: Slow) -> None:
    await client.wait_for_services("slow")
    data = b"w" * (500 * CHUNK)  # ~10 s at the handler's pace
    with trio.move_on_after(0.3) as scope:
        await client.call("slow.read_slowly", stream=nerve.PacketStream.from_iterable(_pieces(data)))
    assert scope.cancelled_caught
    with trio.fail_after(3):
        await slow.handler_done.wait()
    assert slow.handler_outcome in ("cancelled", "StreamError")


class Endless(nerve.Service):
    name = "endless"

    def __init__(self) -> None:
        self.producer_error: BaseException | None = None
        self.producer_done = trio.Event()

    @nerve.action
    async def feed(self, ctx: nerve.Context) -> nerve.PacketStream:
        stream = ctx.broker.create_stream()

        async def produce() -> None:
            try:
                while True:
                    await stream.send(b"v" * CHUNK)
            except StreamClosedError as exc:
                self.producer_error = exc
            finally:
                self.producer_done.set()

        ctx.broker.start_soon(produce)
        return stream


async def test_reader_closing_early_stops_the_remote_producer() -> None:
    endless = Endless()
    kw: dict[str, Any] = {"max_chunk": CHUNK, "stream_window": WINDOW}
    async with nerve.Broker("ce-server", services=[endless], **kw), nerve.Broker("ce-client", **kw) as client:
        await client.wait_for_services("endless")
        reader = await client.call("endless.feed")
        assert await reader.receive() == b"v" * CHUNK
        await reader.close()
        with pytest.raises(StreamClosedError):
            await reader.receive()
        with trio.fail_after(5):
            await endless.producer_done.wait()
        assert isinstance(endless.producer_error, StreamClosedError)


async def test_per_call_idle_timeout_overrides_the_brokers() -> None:
    client, server, _ = brokers(local_idle=30.0)
    async with client, server:
        await client.wait_for_services("slow")
        stream = await client.call("slow.stall_after_first", idle_timeout=0.2)
        assert await stream.receive() == b"x" * CHUNK
        start = trio.current_time()
        with trio.fail_after(5):
            with pytest.raises(StreamIdleTimeoutError):
                await stream.receive()
        assert trio.current_time() - start < 2.0
