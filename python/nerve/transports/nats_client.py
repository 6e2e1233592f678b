"""A thin NATS core client on trio (no NATS client for trio exists on PyPI: nats-py is
asyncio-only): CONNECT, PUB, SUB, MSG, PING/PONG on one connection to one server. The
transport (``nerve.transports.nats``) owns reconnection and the subjects."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import trio

from nerve.errors import BrokerOptionsError, ProtocolError

__all__ = ["NatsClient"]

_MAX_CONTROL_LINE = 4096


class NatsClient:
    """NATS core protocol on a trio stream: CONNECT, PUB, SUB, MSG, PING/PONG.

    ``messages`` yields ``(subject, payload)``; publishing appends to a buffer flushed by one
    writer task (many PUBs, one ``send_all``)."""

    def __init__(self, stream: trio.SocketStream, *, name: str, max_payload: int = 64 * 1024 * 1024) -> None:
        self.stream = stream
        self.name = name
        self.max_payload = max_payload
        self.server_info: dict[str, Any] = {}
        self._out: list[bytes] = []
        self._wakeup = trio.Event()
        self._sids: dict[int, str] = {}
        self._next_sid = 1
        self._buffer = bytearray()

    @classmethod
    async def connect(cls, url: str, *, name: str) -> NatsClient:
        parts = urlsplit(url)
        if parts.scheme != "nats" or not parts.hostname:
            raise BrokerOptionsError(f"expected 'nats://host:port', got {url!r}")
        stream = await trio.open_tcp_stream(parts.hostname, parts.port or 4222)
        client = cls(stream, name=name)
        line = await client._read_line()
        if not line.startswith(b"INFO "):
            raise ProtocolError(f"NATS server sent {line[:40]!r} instead of INFO", reason="nats")
        client.server_info = json.loads(line[5:])
        client.max_payload = int(client.server_info.get("max_payload", client.max_payload))
        connect = {"verbose": False, "pedantic": False, "name": name, "lang": "python-nerve",
                   "version": "0.1.0", "protocol": 1, "headers": False}
        await stream.send_all(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        while True:
            line = await client._read_line()
            if line == b"PONG":
                return client
            if line.startswith(b"-ERR"):
                raise ProtocolError(f"NATS refused the connection: {line.decode(errors='replace')}",
                                    reason="nats")

    async def _read_line(self) -> bytes:
        while True:
            at = self._buffer.find(b"\r\n")
            if at >= 0:
                line = bytes(self._buffer[:at])
                del self._buffer[:at + 2]
                return line
            if len(self._buffer) > _MAX_CONTROL_LINE:
                raise ProtocolError("NATS control line too long", reason="nats")
            data = await self.stream.receive_some(65536)
            if not data:
                raise trio.BrokenResourceError("NATS server closed the connection")
            self._buffer += data

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            data = await self.stream.receive_some(max(65536, n - len(self._buffer)))
            if not data:
                raise trio.BrokenResourceError("NATS server closed the connection")
            self._buffer += data
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def subscribe(self, subject: str, queue: str | None = None) -> int:
        sid = self._next_sid
        self._next_sid += 1
        self._sids[sid] = subject
        self._send(f"SUB {subject} {queue + ' ' if queue else ''}{sid}\r\n".encode())
        return sid

    def publish(self, subject: str, payload: bytes) -> None:
        if len(payload) > self.max_payload:
            raise ProtocolError(f"payload of {len(payload)} bytes is over the NATS max_payload "
                                f"{self.max_payload}", reason="nats_max_payload")
        self._send(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(payload), payload))

    def _send(self, data: bytes) -> None:
        self._out.append(data)
        self._wakeup.set()

    async def writer(self) -> None:
        while True:
            if not self._out:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            data, self._out = b"".join(self._out), []
            await self.stream.send_all(data)

    async def messages(self) -> Any:
        """Yield ``(subject, payload)`` for every MSG; answers PING; raises on -ERR."""
        while True:
            line = await self._read_line()
            if line.startswith(b"MSG "):
                parts = line.split(b" ")
                if len(parts) not in (4, 5):
                    raise ProtocolError(f"bad NATS MSG line {line[:80]!r}", reason="nats")
                try:
                    size = int(parts[-1])
                except ValueError:
                    raise ProtocolError(f"bad NATS MSG line {line[:80]!r}", reason="nats") from None
                payload = await self._read_exactly(size + 2)
                yield parts[1].decode(errors="replace"), payload[:-2]
            elif line == b"PING":
                self._send(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise ProtocolError(f"NATS error: {line.decode(errors='replace')}", reason="nats")
            # +OK, PONG, INFO updates: nothing to do
