"""The contract between the transit (packets, calls, streams) and a transport (bytes to nodes).

Imports nothing above the wire layer: a transport talks upward only through :class:`Upstream`.

A transport delivers ``(kind, payload)`` frames to named nodes and reports peers coming and
going; it never decodes packets. Sends are non-blocking appends; ``wait_writable`` is the
backpressure point for bulk producers.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio

from nerve.statistics import TransportStatistics

__all__ = ["Transport", "Upstream"]


class Upstream(Protocol):
    """What a transport may tell or ask the layer above it (the transit implements it). A
    transport never builds or decodes packets: the frames it originates (heartbeats, a bus's
    greeting) are built here, and a bus transport hands frames up without knowing their sender.
    """

    node_id: str
    namespace: str
    ver: str
    heartbeat_interval: float
    heartbeat_timeout: float
    #: (stream window, max chunk) this node accepts as a reader
    stream_config: tuple[int, int]

    def on_connected(self, node_id: str) -> None: ...

    def on_disconnected(self, node_id: str, *, graceful: bool) -> None: ...

    def on_frame(self, sender: str, kind: int, payload: bytes) -> None:
        """One frame of ``sender``; raises ProtocolError (a NerveError) for a malformed one."""

    def on_bus_frame(self, kind: int, payload: bytes) -> None:
        """One frame from a bus (NATS), its sender in the packet; raises ProtocolError."""

    def on_stream_data(self, sender: str, flags: int, stream_id: str, seq: int, chunk: Any) -> None: ...

    def on_stream_credit(self, sender: str, flags: int, stream_id: str, consumed: int) -> None: ...

    def on_cancel(self, sender: str, call_id: str) -> None:
        """``sender`` stopped waiting for its call ``call_id`` (a CANCEL frame)."""

    def heartbeat_frame(self) -> tuple[int, bytes]:
        """(kind, payload) of a HEARTBEAT of this node, to send to every peer."""

    def greeting_frames(self) -> list[tuple[int, bytes]]:
        """What a bus transport broadcasts once connected (DISCOVER, then our INFO)."""


class Transport:
    """Base class of transports."""

    #: True when the transport carries STREAM_DATA / STREAM_CREDIT frames natively.
    native_streams: bool = False
    #: The address other nodes can reach this one at, once serving (None for local).
    address: str | None = None
    #: Request streams this node serves at once per peer, told to peers (0: not told).
    max_streams: int = 0
    #: A bus (NATS): nerve's stream frames reach the nerve nodes that said in their INFO that
    #: they read them (``set_peer_streams``); the others get Moleculer's stream packets.
    bus_streams: bool = False
    #: The largest payload one frame may carry (a NATS server's ``max_payload``; None: the
    #: transport's frame limit is far above any chunk)
    max_payload: int | None = None
    #: Bytes written to / read from the network so far (see TransportStatistics).
    bytes_sent: int = 0
    bytes_received: int = 0
    #: the logger this transport's records go to; they carry the node's ``node_id``
    logger_name: str = "nerve.transport"

    @property
    def log(self) -> logging.LoggerAdapter:  # type: ignore[type-arg]
        """This transport's logger: its records carry ``node_id`` once the node serves."""
        upstream = getattr(self, "upstream", None)
        node = upstream.node_id if upstream is not None else None
        cached = self.__dict__.get("_log")
        if cached is None or cached.extra.get("node_id") != node:
            cached = self.__dict__["_log"] = logging.LoggerAdapter(
                logging.getLogger(self.logger_name), {"node_id": node} if node is not None else {})
        return cached  # type: ignore[no-any-return]

    def statistics(self) -> TransportStatistics:
        """A snapshot of this transport (see :class:`nerve.statistics.TransportStatistics`)."""
        return TransportStatistics(connections=len(self.connected()), bytes_sent=self.bytes_sent,
                                   bytes_received=self.bytes_received)

    def send_cancel(self, node_id: str, call_id: str) -> None:
        """Tell ``node_id`` we stopped waiting for our call ``call_id`` (its handler is cancelled),
        if the transport and the peer can; otherwise nothing (as Moleculer: the callee runs on)."""

    def seen(self, node_id: str, kind: int) -> bool:
        """A bus transport is told of every packet's sender (liveness); True if the node is new
        to it (the transit then asks for its INFO). Connection transports know their peers."""
        return False

    async def serve(self, upstream: Upstream, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; call ``task_status.started()`` once peers can reach us."""
        raise NotImplementedError

    def send(self, node_id: str, kind: int, payload: bytes) -> None:
        """Queue one frame for ``node_id``; raises ``BrokerDisconnectedError`` if unreachable."""
        raise NotImplementedError

    def broadcast(self, kind: int, payload: bytes) -> None:
        """Queue one frame for every connected node."""
        raise NotImplementedError

    def send_stream_data(self, node_id: str, flags: int, stream_id: str, seq: int, chunk: Any) -> None:
        raise NotImplementedError

    def send_stream_credit(self, node_id: str, flags: int, stream_id: str, consumed: int) -> None:
        raise NotImplementedError

    async def wait_writable(self, node_id: str) -> None:
        """Return once the outgoing queue to ``node_id`` is below its high-water mark."""
        await trio.lowlevel.checkpoint()

    def has_room(self, node_id: str, n: int) -> bool:
        """True if a stream chunk of ``n`` bytes may be queued for ``node_id`` now."""
        return True

    async def reserve(self, node_id: str, n: int) -> Any:
        """Wait until a stream chunk of ``n`` bytes may be queued for ``node_id`` (FIFO among
        producers) and hold that room; returns a token for :meth:`release`, which the caller
        calls once it has queued the chunk or given up."""
        await trio.lowlevel.checkpoint()
        return None

    def release(self, token: Any, n: int) -> None:
        """Give back the room :meth:`reserve` held."""

    async def wait_ready(self, node_id: str, n: int) -> None:
        """Wait until a chunk of ``n`` bytes would be admitted now, holding nothing (for a
        producer about to produce its next chunk)."""
        await trio.lowlevel.checkpoint()

    def peer_max_streams(self, node_id: str) -> int:
        """Request streams ``node_id`` serves at once for us (0: no limit known)."""
        return 0

    def streams_native(self, node_id: str) -> bool:
        """True if streams to ``node_id`` travel as nerve's credited stream frames (always on
        a connection transport that carries them; on a bus, for nodes that said so)."""
        return self.native_streams

    def set_peer_streams(self, node_id: str, config: tuple[int, int, int] | None) -> None:
        """A bus: ``node_id`` reads nerve's stream frames with this (window, max chunk, max
        request streams), as its INFO says (None: it does not, or no longer)."""

    def set_balanced(self, actions: list[str], events: list[tuple[str, str]]) -> None:
        """Balanced mode (a bus): serve these actions and (group, event) pairs through the
        bus's queue groups."""
        from nerve.errors import BrokerOptionsError

        raise BrokerOptionsError("disable_balancer=True needs a NATS transport (its queue groups balance)")

    def send_balanced_request(self, action: str, payload: bytes) -> None:
        """Balanced mode: a REQ for whichever node of the bus serves ``action``."""
        raise NotImplementedError

    def send_balanced_event(self, group: str, event: str, payload: bytes) -> None:
        """Balanced mode: an EVENT for one node of the bus whose ``group`` listens to it."""
        raise NotImplementedError

    def peer_stream_config(self, node_id: str) -> tuple[int, int]:
        """(stream window, max chunk) the reading node ``node_id`` accepts."""
        raise NotImplementedError

    def peer_address(self, node_id: str) -> str | None:
        """Where ``node_id`` can be reached, if the transport knows."""
        return None

    def connected(self) -> list[str]:
        raise NotImplementedError

    def unreachable_seeds(self) -> dict[str, str]:
        """Seeds (addresses given by the user) not connected now, with why the last try
        failed ("connection refused", ...); empty when every seed answered or there are none."""
        return {}

    async def disconnect_all(self) -> None:
        """Close every connection (after the transit said goodbye)."""
