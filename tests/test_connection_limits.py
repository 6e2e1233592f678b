"""Connections under pressure from peers (found in review of the hostile-peer work): one host
cannot take every handshake slot, a peer that accepts and drops us is not redialled in a tight
loop, a seed that stops gracefully and comes back is dialled again, and the write queue's
admission never gives the same room twice."""

from __future__ import annotations

import msgspec
import pytest
import trio

import nerve
from nerve.frames import HEADER_LEN, encode_frame
from nerve.transports.tcp import Hello, _hello_decoder

pytestmark = pytest.mark.anyio


async def _connect_from(source: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def test_one_host_cannot_take_every_handshake_slot() -> None:
    """127.0.0.2 holds max_handshakes idle connections (renewing them); a node dialling from
    127.0.0.1 still gets in, because one host holds at most a quarter of the slots."""
    async with nerve.Broker("hs-server", transport="tcp://127.0.0.1:0", max_handshakes=16) as server:
        assert server.address is not None
        port = int(server.address.rsplit(":", 1)[1])
        idle = [await _connect_from("127.0.0.2", port) for _ in range(16)]
        await trio.sleep(0.2)
        stats = server.transport.statistics()  # type: ignore[attr-defined]
        assert stats.handshakes == 4, stats  # 16 // 4 from that host; the rest closed at once
        assert stats.handshakes_over_limit == 12, stats
        async with nerve.Broker("hs-legit", transport="tcp://127.0.0.1:0", peers=[server.address]) as legit:
            with trio.fail_after(5):
                while "hs-server" not in legit.transport.connected():
                    await trio.sleep(0.05)
        for s in idle:
            await s.aclose()


async def test_a_peer_that_accepts_and_drops_us_is_not_redialled_in_a_tight_loop() -> None:
    """A seed that answers the handshake and closes at once (no DISCONNECT): each short-lived
    connection counts as a failure, so dials back off (before: 630 dials in 2 s)."""
    dials = 0

    async def accept_and_drop(stream: trio.SocketStream) -> None:
        nonlocal dials
        dials += 1
        with trio.move_on_after(2):
            header = await stream.receive_some(HEADER_LEN)
            length = int.from_bytes(header[1:5], "big")
            body = b""
            while len(body) < length - HEADER_LEN:
                body += await stream.receive_some(length - HEADER_LEN - len(body))
            _hello_decoder.decode(body)
            ack = Hello(node_id="flaky", address="tcp://127.0.0.1:1", window=1 << 20, max_chunk=1 << 16)
            await stream.send_all(encode_frame(23, msgspec.msgpack.encode(ack)))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, accept_and_drop, listeners)
        async with nerve.Broker("victim", transport="tcp://127.0.0.1:0", peers=[f"tcp://127.0.0.1:{port}"]):
            await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    # Backoff from 50 ms doubling (jittered x0.5-1.5): at most ~8 attempts in 2 s.
    assert 2 <= dials <= 10, dials


async def test_a_seed_that_stops_gracefully_and_comes_back_is_dialled_again() -> None:
    async def run_b(url: str, stop: trio.Event, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        async with nerve.Broker("seed-b", transport=url) as b:
            assert b.address is not None
            task_status.started(b.address)
            await stop.wait()

    async with trio.open_nursery() as nursery:
        stop1 = trio.Event()
        address = await nursery.start(run_b, "tcp://127.0.0.1:0", stop1)
        async with nerve.Broker("seed-a", transport="tcp://127.0.0.1:0", peers=[address]) as a:
            with trio.fail_after(5):
                while "seed-b" not in a.transport.connected():
                    await trio.sleep(0.05)
            stop1.set()
            with trio.fail_after(5):
                while "seed-b" in a.transport.connected():
                    await trio.sleep(0.05)
            stop2 = trio.Event()
            await nursery.start(run_b, address, stop2)
            with trio.fail_after(15):
                while "seed-b" not in a.transport.connected():
                    await trio.sleep(0.05)
            assert await a.ping("seed-b") >= 0
            stop2.set()


async def test_admitted_producers_that_are_slow_to_produce_never_overfill_the_queue() -> None:
    """Room promised to an admitted producer counts as queued until it queues or gives up, so
    producers admitted round after round while earlier ones still wait for their source never
    push the queue past the high-water mark (before: 8 MiB queued, high water 1 MiB, and the
    connection dropped as not reading)."""
    from nerve.transports.tcp import TcpTransport

    high_water = 1024 * 1024
    go = trio.Event()

    class Slow(nerve.Service):
        name = "slow"

        @nerve.action
        async def download(self, ctx: nerve.Context) -> nerve.PacketStream:
            async def chunks():  # type: ignore[no-untyped-def]
                for _ in range(4):
                    await go.wait()
                    yield b"s" * 256 * 1024

            return nerve.PacketStream.from_iterable(chunks())

    server_transport = TcpTransport("tcp://127.0.0.1:0", high_water=high_water, max_write_queue=8 * 1024 * 1024)
    async with nerve.Broker("slow-server", transport=server_transport, services=[Slow()]) as server:
        async with nerve.Broker("slow-client", transport="tcp://127.0.0.1:0", peers=[server.address]) as client:
            await client.wait_for_services("slow")
            peak = 0
            results: list[int] = []

            async def one() -> None:
                stream = await client.call("slow.download")
                results.append(len(await stream.read_all()))

            async def watch() -> None:
                nonlocal peak
                while True:
                    conn = server_transport.connections.get("slow-client")
                    if conn is not None:
                        peak = max(peak, len(conn.encoder))
                    await trio.sleep(0)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async with trio.open_nursery() as calls:
                    for _ in range(60):
                        calls.start_soon(one)
                    await trio.sleep(0.5)
                    go.set()
                nursery.cancel_scope.cancel()
            assert results == [1024 * 1024] * 60
            assert peak <= high_water + 256 * 1024 + 4096, peak
            assert server_transport.statistics().not_reading == 0


async def test_unread_response_streams_count_for_their_peer_until_they_end() -> None:
    """A peer that opens response streams and never reads them keeps them counted against its
    share, so another peer still gets served (before: the streams stopped counting once their
    RES was out, the hog took every handler slot and the other peer got QueueIsFullError)."""
    from nerve.errors import QueueIsFullError

    class Feed(nerve.Service):
        name = "feed"

        @nerve.action
        async def endless(self, ctx: nerve.Context) -> nerve.PacketStream:
            async def chunks():  # type: ignore[no-untyped-def]
                while True:
                    yield b"x" * 65536

            return nerve.PacketStream.from_iterable(chunks())

        @nerve.action
        async def ping(self, ctx: nerve.Context) -> str:
            return "pong"

    async with nerve.Broker("feed-server", transport="tcp://127.0.0.1:0", services=[Feed()],
                            max_pending_requests=8) as server:
        async with nerve.Broker("hog", transport="tcp://127.0.0.1:0", peers=[server.address]) as hog, \
                nerve.Broker("other", transport="tcp://127.0.0.1:0", peers=[server.address]) as other:
            await hog.wait_for_services("feed")
            await other.wait_for_services("feed")
            held = []
            with pytest.raises(QueueIsFullError, match="requests of 'hog'"):
                for _ in range(20):
                    held.append(await hog.call("feed.endless"))
            assert len(held) == 4  # its fair share: 8 // 2 connected peers
            assert server.transit.peer_requests == {"hog": 4}
            assert await other.call("feed.ping") == "pong"
            for stream in held:
                await stream.close()
            with trio.fail_after(5):
                while server.transit.peer_requests:
                    await trio.sleep(0.05)
