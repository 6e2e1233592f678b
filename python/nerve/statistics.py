"""Statistics: frozen snapshots of a node and its parts, as trio's ``statistics()`` are.

Theory of operation. Each part of a node keeps plain integer counters that its own code
bumps (an attribute increment on the hot path, nothing more), and answers ``statistics()``
with one of these frozen dataclasses, built from those counters when asked. A snapshot never
changes after it is taken: compare two to see what happened between them. The broker's
(:meth:`nerve.Broker.statistics`) nests the others; ``$node.health``, ``nerve.metrics`` (the
Prometheus exposition) and the CLI read nothing else.

Counters count from the broker's creation and never go down; gauges ("now") are read at
the moment of the snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BrokerStatistics",
    "HandlerPoolStatistics",
    "RegistryStatistics",
    "StreamStatistics",
    "TransitStatistics",
    "TransportStatistics",
]


@dataclass(frozen=True)
class HandlerPoolStatistics:
    """The pool of worker tasks that runs handlers (``nerve._dispatch.HandlerPool``)."""

    #: work items queued or running now (remote requests, events, stream pumps)
    active: int
    #: of them, queued and not started yet
    queued: int
    #: worker tasks alive now
    workers: int
    #: of them, parked and waiting for work
    idle_workers: int


@dataclass(frozen=True)
class TransportStatistics:
    """What every transport reports (a transport may report more: ``TcpStatistics``)."""

    #: peers (TCP connections, or nodes heard on the bus) connected now
    connections: int
    #: bytes written to the network (TCP: established connections' frames, framing
    #: included, handshakes not, counted before TLS encryption; NATS: message
    #: payloads published; in-process: frame payloads)
    bytes_sent: int
    #: bytes read from the network, counted as ``bytes_sent`` is
    bytes_received: int


@dataclass(frozen=True)
class TransitStatistics:
    """Moleculer packets and the calls they carry (``nerve.transit.Transit``)."""

    #: packets sent (REQ, RES, EVENT, INFO, HEARTBEAT, ...; a broadcast counts once)
    packets_sent: int
    #: packets received and decoded
    packets_received: int
    #: REQ packets sent (remote call attempts)
    requests_sent: int
    #: REQ packets received
    requests_received: int
    #: of them, refused before a handler ran (no such action here, queue full, stopping)
    requests_rejected: int
    #: of them, whose handler failed (the caller got an error); not those its caller cut
    #: short (a CANCEL, an aborted request stream): metrics count every error answered
    requests_failed: int
    #: calls of this node waiting for an answer now
    requests_waiting: int
    #: requests of peers being served now (response streams included)
    requests_in_service: int
    #: requests cancelled by their caller (CANCEL) while served here
    cancelled: int
    #: frames that broke the protocol (each ended its connection, not the node)
    protocol_errors: int
    #: EVENT packets sent
    events_sent: int
    #: EVENT packets received
    events_received: int
    #: streams this node reads from a peer now
    streams_reading: int
    #: streams this node writes to a peer now
    streams_writing: int
    #: nodes connected now
    peers: int


@dataclass(frozen=True)
class RegistryStatistics:
    """What the registry knows of the cluster (``nerve.registry.Registry``)."""

    #: nodes known (this one included)
    nodes: int
    #: of them, available now
    nodes_online: int
    #: distinct services (by full name)
    services: int
    #: service instances over all nodes
    service_endpoints: int
    #: distinct actions
    actions: int
    #: action endpoints over all nodes
    action_endpoints: int
    #: distinct events subscribed to
    events: int
    #: event subscriptions over all nodes
    event_endpoints: int


@dataclass(frozen=True)
class StreamStatistics:
    """One :class:`~nerve.PacketStream` (``stream.statistics()``)."""

    #: bytes this side produced (sent) so far
    bytes_sent: int
    #: bytes that reached this side's reader so far (read or buffered)
    bytes_received: int
    #: chunks produced so far
    chunks_sent: int
    #: chunks that reached the reader so far
    chunks_received: int
    #: bytes received and not read yet (reader side)
    bytes_buffered: int
    #: bytes the producer may send before it waits (producer side)
    credit: int
    #: seconds the producer spent waiting for credit from its reader
    credit_wait: float
    window: int
    max_chunk: int


@dataclass(frozen=True)
class BrokerStatistics:
    """A node: its counters, and its parts' snapshots (``broker.statistics()``)."""

    node_id: str
    #: whether the broker is started and not stopped
    running: bool
    #: seconds since the broker started (0 when it is not running)
    uptime: float
    #: local services (``$node`` included)
    services: int
    #: calls made by this node (``broker.call`` / ``ctx.call``; retries count once)
    calls: int
    #: of them, that ended with an error
    calls_failed: int
    #: action handlers run here, for a local caller or a remote one
    requests_served: int
    #: of them, that failed (as TransitStatistics.requests_failed; local calls: any error)
    requests_failed: int
    #: events emitted here (``emit``), whatever the number of handlers that got them
    events_emitted: int
    #: events broadcast here (``broadcast`` / ``broadcast_local``)
    events_broadcast: int
    #: event handlers started here (one per local subscription an event reached)
    events_handled: int
    #: of them, that raised
    event_handler_errors: int
    handler_pool: HandlerPoolStatistics
    transit: TransitStatistics
    transport: TransportStatistics
    registry: RegistryStatistics
