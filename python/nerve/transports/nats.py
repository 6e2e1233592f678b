"""NATS transport: Moleculer's subjects over a thin trio NATS core client, so that nerve nodes
join a moleculer.js cluster (``MOL[-namespace].<TYPE>[.<nodeID>]``, JSON by default).

Discovery and liveness are Moleculer's: DISCOVER and INFO broadcasts, HEARTBEAT every
``heartbeat_interval``, a node silent for ``heartbeat_timeout`` is lost. Streams are not
carried over NATS yet (a call with a stream raises a clear error). A broken NATS connection
is re-established with backoff; peers then rediscover each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from nerve.errors import BrokerDisconnectedError, BrokerOptionsError, NerveError, ProtocolError
from nerve.packets import PacketType
from nerve.transports.base import Transport
from nerve.transports.nats_client import NatsClient

if TYPE_CHECKING:
    from nerve.transports.base import Upstream

__all__ = ["NatsTransport", "NatsClient"]

_DISCONNECT = int(PacketType.DISCONNECT)


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

