"""The contract between the transit (packets, calls, streams) and a transport (bytes to nodes).

A transport delivers ``(kind, payload)`` frames to named nodes and reports peers coming and
going; it never decodes packets. Sends are non-blocking appends; ``wait_writable`` is the
backpressure point for bulk producers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from nerve.transit import Transit

__all__ = ["Transport"]


class Transport:
    """Base class of transports."""

    #: True when the transport carries STREAM_DATA / STREAM_CREDIT frames natively.
    native_streams: bool = False
    #: The address other nodes can reach this one at, once serving (None for local).
    address: str | None = None
    #: Request streams this node serves at once per peer, told to peers (0: not told).
    max_streams: int = 0

    async def serve(self, transit: Transit, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
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

    def peer_stream_config(self, node_id: str) -> tuple[int, int]:
        """(stream window, max chunk) the reading node ``node_id`` accepts."""
        raise NotImplementedError

    def peer_address(self, node_id: str) -> str | None:
        """Where ``node_id`` can be reached, if the transport knows."""
        return None

    def connected(self) -> list[str]:
        raise NotImplementedError

    async def disconnect_all(self) -> None:
        """Close every connection (after the transit said goodbye)."""
