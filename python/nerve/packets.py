"""The Moleculer packet model (protocol v5, with v4 as a switch), as msgspec Structs.

A packet's type is not in its payload (Moleculer carries it in the topic or the frame type);
:class:`PacketType` names it. Fields absent on the wire stay ``UNSET`` so that a decoded
packet re-encodes to the same payload. This module owns no I/O and no serialization.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

from msgspec import UNSET, Struct, UnsetType, field

__all__ = [
    "PROTOCOL_VERSION",
    "PacketType",
    "Packet",
    "Discover",
    "Info",
    "Heartbeat",
    "Request",
    "Response",
    "Event",
    "Ping",
    "Pong",
    "Disconnect",
    "GossipHello",
    "GossipRequest",
    "GossipResponse",
    "PACKET_CLASSES",
    "UNSET",
]

PROTOCOL_VERSION = "5"
"""Moleculer 0.15's protocol; ``"4"`` is moleculer 0.14's (and moleculer-java's)."""

Number = int | float


class PacketType(enum.IntEnum):
    """Packet types; values are the frame type ids of the TCP framing (Moleculer's 1..8 and
    nerve's own ids for the packets Moleculer never sends over TCP)."""

    EVENT = 1
    REQ = 2
    RES = 3
    PING = 4
    PONG = 5
    GOSSIP_REQ = 6
    GOSSIP_RES = 7
    GOSSIP_HELLO = 8
    DISCOVER = 17
    INFO = 18
    HEARTBEAT = 19
    DISCONNECT = 20


class Packet(Struct, kw_only=True):
    """Fields on every payload: protocol version and sending node id."""

    kind: ClassVar[PacketType]
    ver: str = PROTOCOL_VERSION
    sender: str = ""


class Discover(Packet, kw_only=True):
    kind: ClassVar[PacketType] = PacketType.DISCOVER


class Info(Packet, kw_only=True):
    """A node's description: its services (with actions and events) and identity."""

    kind: ClassVar[PacketType] = PacketType.INFO
    services: list[dict[str, Any]] = []
    config: dict[str, Any] | None | UnsetType = UNSET
    ip_list: list[str] | None | UnsetType = field(default=UNSET, name="ipList")
    hostname: str | None | UnsetType = UNSET
    client: dict[str, Any] | None | UnsetType = UNSET
    instance_id: str | None | UnsetType = field(default=UNSET, name="instanceID")
    metadata: dict[str, Any] | None | UnsetType = UNSET
    seq: int | None | UnsetType = UNSET
    port: int | None | UnsetType = UNSET
    #: nerve's own (on a bus): ``{"streams": {"window", "maxChunk", "maxStreams"}}`` says this
    #: node reads nerve's credited stream frames; moleculer.js keeps it unread in rawInfo
    nerve: Any = UNSET


class Heartbeat(Packet, kw_only=True):
    kind: ClassVar[PacketType] = PacketType.HEARTBEAT
    cpu: Number | None | UnsetType = UNSET


class Request(Packet, kw_only=True):
    """REQ: a call (seq 0) or, with ``stream``, one packet of its request stream."""

    kind: ClassVar[PacketType] = PacketType.REQ
    id: str
    action: str
    params: Any = None
    meta: dict[str, Any] | None | UnsetType = UNSET
    headers: dict[str, Any] | None | UnsetType = UNSET
    timeout: Number | None | UnsetType = UNSET
    level: int | UnsetType = UNSET
    tracing: Any = UNSET
    parent_id: str | None | UnsetType = field(default=UNSET, name="parentID")
    request_id: str | None | UnsetType = field(default=UNSET, name="requestID")
    caller: str | None | UnsetType = UNSET
    stream: bool | None | UnsetType = UNSET
    seq: int | None | UnsetType = UNSET
    params_type: int | None | UnsetType = field(default=UNSET, name="paramsType")


class Response(Packet, kw_only=True):
    """RES: a call's result or error or, with ``stream``, one packet of its response stream."""

    kind: ClassVar[PacketType] = PacketType.RES
    id: str
    success: bool = True
    data: Any = None
    error: dict[str, Any] | None | UnsetType = UNSET
    meta: dict[str, Any] | None | UnsetType = UNSET
    headers: dict[str, Any] | None | UnsetType = UNSET
    stream: bool | None | UnsetType = UNSET
    seq: int | None | UnsetType = UNSET
    data_type: int | None | UnsetType = field(default=UNSET, name="dataType")


class Event(Packet, kw_only=True):
    """EVENT: ``groups`` picks one handler per group; ``broadcast`` reaches every handler."""

    kind: ClassVar[PacketType] = PacketType.EVENT
    event: str
    id: str | None | UnsetType = UNSET
    data: Any = None
    groups: list[str] | None | UnsetType = UNSET
    broadcast: bool | None | UnsetType = UNSET
    meta: dict[str, Any] | None | UnsetType = UNSET
    headers: dict[str, Any] | None | UnsetType = UNSET
    level: int | None | UnsetType = UNSET
    tracing: Any = UNSET
    parent_id: str | None | UnsetType = field(default=UNSET, name="parentID")
    request_id: str | None | UnsetType = field(default=UNSET, name="requestID")
    caller: str | None | UnsetType = UNSET
    need_ack: bool | None | UnsetType = field(default=UNSET, name="needAck")
    stream: bool | None | UnsetType = UNSET
    seq: int | None | UnsetType = UNSET
    data_type: int | None | UnsetType = field(default=UNSET, name="dataType")


class Ping(Packet, kw_only=True):
    kind: ClassVar[PacketType] = PacketType.PING
    time: Number | None | UnsetType = UNSET
    id: str | None | UnsetType = UNSET


class Pong(Packet, kw_only=True):
    kind: ClassVar[PacketType] = PacketType.PONG
    time: Number | None | UnsetType = UNSET
    id: str | None | UnsetType = UNSET
    arrived: Number | None | UnsetType = UNSET


class Disconnect(Packet, kw_only=True):
    kind: ClassVar[PacketType] = PacketType.DISCONNECT


class GossipHello(Packet, kw_only=True):
    kind: ClassVar[PacketType] = PacketType.GOSSIP_HELLO
    host: str | None | UnsetType = UNSET
    port: int | None | UnsetType = UNSET


class GossipRequest(Packet, kw_only=True):
    kind: ClassVar[PacketType] = PacketType.GOSSIP_REQ
    online: dict[str, list[Any]] | UnsetType = UNSET
    offline: dict[str, int] | UnsetType = UNSET


class GossipResponse(Packet, kw_only=True):
    kind: ClassVar[PacketType] = PacketType.GOSSIP_RES
    online: dict[str, list[Any]] | UnsetType = UNSET
    offline: dict[str, int] | UnsetType = UNSET


PACKET_CLASSES: dict[PacketType, type[Packet]] = {
    cls.kind: cls
    for cls in (Discover, Info, Heartbeat, Request, Response, Event, Ping, Pong, Disconnect,
                GossipHello, GossipRequest, GossipResponse)
}

