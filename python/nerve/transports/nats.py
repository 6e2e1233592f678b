"""NATS transport: Moleculer's subjects over a thin trio NATS core client, so that nerve nodes
join a moleculer.js cluster (``MOL[-namespace].<TYPE>[.<nodeID>]``, JSON by default).

Discovery and liveness are Moleculer's: DISCOVER and INFO broadcasts, HEARTBEAT every
``heartbeat_interval``, a node silent for ``heartbeat_timeout`` is lost. Streams are not
carried over NATS yet (a call with a stream raises a clear error). A broken NATS connection
is re-established with backoff; peers then rediscover each other.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio

from nerve.errors import BrokerDisconnectedError, BrokerOptionsError, NerveError, ProtocolError
from nerve.packets import PacketType
from nerve.transports.base import Transport

if TYPE_CHECKING:
    from nerve.transports.base import Upstream

__all__ = ["NatsTransport", "NatsClient"]

_DISCONNECT = int(PacketType.DISCONNECT)


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


class NatsTransport(Transport):
    """Moleculer's NATS transporter, for moleculer.js interop (``transport="nats://host:port"``)."""

    logger_name = "nerve.nats"

    native_streams = False

    def __init__(self, url: str, *, peers: list[str] | tuple[str, ...] = (), **_: Any) -> None:
        if peers:
            raise BrokerOptionsError("peers= is for the tcp transport; NATS finds nodes by itself")
        self.url = url
        self.address = None
        self.upstream: Upstream | None = None
        self.client: NatsClient | None = None
        self.prefix = "MOL"
        self._last_seen: dict[str, float] = {}

    def _subject(self, kind: int, node_id: str | None = None) -> str:
        name = PacketType(kind).name
        return f"{self.prefix}.{name}.{node_id}" if node_id else f"{self.prefix}.{name}"

    async def serve(self, upstream: Upstream, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (and reconnect with backoff whenever the NATS connection breaks)."""
        self.upstream = upstream
        if upstream.namespace:
            self.prefix = f"MOL-{upstream.namespace}"
        first = True
        delay = 0.1
        while True:
            try:
                client = await NatsClient.connect(self.url, name=upstream.node_id)
            except (OSError, trio.BrokenResourceError, ProtocolError) as exc:
                if first:
                    raise BrokerDisconnectedError(f"cannot connect to NATS at {self.url}: {exc}") from exc
                self.log.warning("NATS at %s unreachable (%s); retrying in %.1fs", self.url, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            try:
                await self._run(client, task_status if first else trio.TASK_STATUS_IGNORED)
            except* (OSError, trio.BrokenResourceError, ProtocolError) as group:
                self.log.warning("NATS connection lost (%s); reconnecting", group.exceptions[0])
            finally:
                self.client = None
            first = False

    async def _run(self, client: NatsClient, task_status: Any) -> None:
        assert self.upstream is not None
        me = self.upstream.node_id
        for name in ("EVENT", "REQ", "RES", "DISCOVER", "INFO", "PING", "PONG"):
            client.subscribe(f"{self.prefix}.{name}.{me}")
        for name in ("DISCOVER", "INFO", "HEARTBEAT", "DISCONNECT"):
            client.subscribe(f"{self.prefix}.{name}")
        self.client = client
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.writer)
                nursery.start_soon(self._reader, client)
                nursery.start_soon(self._heartbeats)
                for kind, payload in self.upstream.greeting_frames():
                    self._publish(kind, None, payload)
                task_status.started()
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(client.stream)

    def _publish(self, kind: int, node_id: str | None, payload: bytes) -> None:
        if self.client is None:
            raise BrokerDisconnectedError("not connected to NATS")
        self.client.publish(self._subject(kind, node_id), payload)
        self.bytes_sent += len(payload)

    async def _reader(self, client: NatsClient) -> None:
        assert self.upstream is not None
        upstream = self.upstream
        async for subject, payload in client.messages():
            parts = subject.split(".")
            if len(parts) < 2:
                continue
            try:
                kind = int(PacketType[parts[1]])
            except KeyError:
                self.log.debug("ignoring NATS subject %s", subject)
                continue
            self.bytes_received += len(payload)
            try:
                upstream.on_bus_frame(kind, payload)
            except NerveError as exc:
                self.log.warning("dropping a %s on %s: %s", parts[1], subject, exc)
            except Exception:  # a packet reached something unexpected: drop it, keep the node
                self.log.exception("dropping a %s on %s: error while handling it", parts[1], subject)

    def seen(self, node_id: str, kind: int) -> bool:
        fresh = node_id not in self._last_seen
        if kind == _DISCONNECT:
            self._last_seen.pop(node_id, None)
        else:
            self._last_seen[node_id] = trio.current_time()
        return fresh

    async def _heartbeats(self) -> None:
        assert self.upstream is not None
        upstream = self.upstream
        while True:
            await trio.sleep(upstream.heartbeat_interval)
            kind, payload = upstream.heartbeat_frame()
            self._publish(kind, None, payload)
            now = trio.current_time()
            for node, seen in list(self._last_seen.items()):
                if now - seen > upstream.heartbeat_timeout:
                    del self._last_seen[node]
                    self.log.warning("node %s silent for %.1fs: marking it lost", node, now - seen)
                    upstream.on_disconnected(node, graceful=False)

    # --- Transport API ------------------------------------------------------------------

    def send(self, node_id: str, kind: int, payload: bytes) -> None:
        self._publish(kind, node_id, payload)

    def broadcast(self, kind: int, payload: bytes) -> None:
        self._publish(kind, None, payload)

    def peer_stream_config(self, node_id: str) -> tuple[int, int]:
        raise BrokerOptionsError("streams are not carried over the NATS transport yet; use tcp://")

    def send_stream_data(self, node_id: str, flags: int, stream_id: str, seq: int, chunk: Any) -> None:
        raise BrokerOptionsError("streams are not carried over the NATS transport yet")

    def send_stream_credit(self, node_id: str, flags: int, stream_id: str, consumed: int) -> None:
        raise BrokerOptionsError("streams are not carried over the NATS transport yet")

    def connected(self) -> list[str]:
        return list(self._last_seen)

    async def disconnect_all(self) -> None:
        if self.client is not None:
            with trio.move_on_after(1):
                while self.client._out:
                    await trio.sleep(0.01)
        await trio.lowlevel.checkpoint()

    async def wait_writable(self, node_id: str) -> None:
        await trio.lowlevel.checkpoint()

