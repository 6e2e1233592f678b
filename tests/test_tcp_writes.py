"""The TCP connection's write path on a real socket pair: eager writes from the queueing task,
what the socket does not take (``_unsent``), and the backpressure signal producers wait on."""

from __future__ import annotations

import socket

import trio

from nerve.frames import FrameDecoder
from nerve.transports.tcp import Connection, Hello

HIGH_WATER = 256 * 1024


class _Transport:
    """What a Connection reads of its transport."""

    max_frame_size = 16 * 1024 * 1024
    high_water = HIGH_WATER
    max_write_queue = 64 * 1024 * 1024
    transit = None
    bytes_sent = 0
    bytes_received = 0


def _connection() -> tuple[Connection, socket.socket]:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    return Connection(_Transport(), stream, Hello(node_id="peer"), FrameDecoder(1 << 24)), b  # type: ignore[arg-type]


def test_backpressure_holds_while_the_cut_short_write_goes_out() -> None:
    """An eager write the socket takes only part of leaves the rest in ``_unsent``; frames
    queued behind it pass the high-water mark. A producer waiting for the queue to drain must
    stay blocked while the writer sends ``_unsent``, and go on once the queue is truly sent.
    Then the peer receives every frame, whole and in order."""

    async def main() -> None:
        conn, peer = _connection()
        conn.send(1, b"x" * (2 * 1024 * 1024))
        assert conn._unsent, "the socket took everything: nothing is tested"
        for i in range(8):
            conn.send(2, bytes([i]) * (100 * 1024))
        assert len(conn.encoder) > HIGH_WATER
        received = bytearray()
        woke_with: list[int] = []

        async def producer() -> None:
            await conn.wait_writable()
            woke_with.append(len(conn.encoder) + sum(memoryview(p).nbytes for p in conn._unsent))

        async def drain_peer() -> None:
            peer.setblocking(False)
            while True:
                await trio.lowlevel.wait_readable(peer)
                received.extend(peer.recv(1 << 20))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            await trio.sleep(0.01)
            nursery.start_soon(conn.writer)
            await trio.sleep(0.2)
            assert woke_with == [], "woke while the peer read nothing and the queue was full"
            nursery.start_soon(drain_peer)
            with trio.fail_after(10):
                while len(received) < 2 * 1024 * 1024 + 8 * 100 * 1024 + 9 * 6:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert woke_with and woke_with[0] <= HIGH_WATER
        frames = FrameDecoder(1 << 24).feed(bytes(received))
        assert [(f[0], bytes(f[1])) for f in frames] == (
            [(1, b"x" * (2 * 1024 * 1024))] + [(2, bytes([i]) * (100 * 1024)) for i in range(8)])
        peer.close()

    trio.run(main)
