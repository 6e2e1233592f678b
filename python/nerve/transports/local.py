"""In-process transport: any number of brokers of one process, connected in memory.

Frames are handed to the target broker's transit synchronously, already serialized (so no
object is shared between brokers); the target spawns handler tasks in its own nursery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from nerve.errors import BrokerDisconnectedError, BrokerOptionsError
from nerve.transports.base import Transport

if TYPE_CHECKING:
    from nerve.transports.base import Upstream

__all__ = ["LocalTransport"]

_BUSES: dict[str, dict[str, LocalTransport]] = {}


class LocalTransport(Transport):
    native_streams = True

    def __init__(self) -> None:
        self.upstream: Upstream | None = None
        self._bus: dict[str, LocalTransport] | None = None
        self._node_id = ""

    async def serve(self, upstream: Upstream, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.upstream = upstream
        self._node_id = upstream.node_id
        bus = _BUSES.setdefault(upstream.namespace, {})
        if self._node_id in bus:
            raise BrokerOptionsError(
                f"node id {self._node_id!r} is already used by another local broker in namespace "
                f"{upstream.namespace!r}")
        bus[self._node_id] = self
        self._bus = bus
        try:
            peers = [p for p in bus.values() if p is not self and p.upstream is not None]
            task_status.started()
            for peer in peers:
                assert peer.upstream is not None
                peer.upstream.on_connected(self._node_id)
                upstream.on_connected(peer._node_id)
            await trio.sleep_forever()
        finally:
            self._leave()

    def _leave(self) -> None:
        bus = self._bus
        if bus is None:
            return
        self._bus = None
        if bus.get(self._node_id) is self:
            del bus[self._node_id]
        for peer in list(bus.values()):
            if peer.upstream is not None:
                peer.upstream.on_disconnected(self._node_id, graceful=True)
        if not bus:
            _BUSES.pop(self.upstream.namespace if self.upstream else "", None)

    def _target(self, node_id: str) -> Upstream:
        return self._peer(node_id).upstream  # type: ignore[return-value]

    def _peer(self, node_id: str) -> LocalTransport:
        bus = self._bus
        peer = bus.get(node_id) if bus is not None else None
        if peer is None or peer.upstream is None:
            raise BrokerDisconnectedError(f"node '{node_id}' is not connected", data={"nodeID": node_id})
        return peer

    def send(self, node_id: str, kind: int, payload: bytes) -> None:
        peer = self._peer(node_id)
        n = len(payload)
        self.bytes_sent += n
        peer.bytes_received += n
        peer.upstream.on_frame(self._node_id, kind, payload)  # type: ignore[union-attr]

    def broadcast(self, kind: int, payload: bytes) -> None:
        for node_id in self.connected():
            self.send(node_id, kind, payload)

    def send_stream_data(self, node_id: str, flags: int, stream_id: str, seq: int, chunk: Any) -> None:
        peer = self._peer(node_id)
        n = len(chunk)
        self.bytes_sent += n
        peer.bytes_received += n
        peer.upstream.on_stream_data(self._node_id, flags, stream_id, seq, bytes(chunk))  # type: ignore[union-attr]

    def send_stream_credit(self, node_id: str, flags: int, stream_id: str, consumed: int) -> None:
        self._target(node_id).on_stream_credit(self._node_id, flags, stream_id, consumed)

    def send_cancel(self, node_id: str, call_id: str) -> None:
        bus = self._bus
        peer = bus.get(node_id) if bus is not None else None
        if peer is not None and peer.upstream is not None:
            peer.upstream.on_cancel(self._node_id, call_id)

    def peer_stream_config(self, node_id: str) -> tuple[int, int]:
        return self._target(node_id).stream_config

    def connected(self) -> list[str]:
        bus = self._bus
        if bus is None:
            return []
        return [n for n, p in bus.items() if p is not self and p.upstream is not None]

    async def disconnect_all(self) -> None:
        self._leave()
        await trio.lowlevel.checkpoint()
