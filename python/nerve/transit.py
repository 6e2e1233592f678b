"""Transit: packets to and from the node. Pending calls, admission, discovery, stream routing.

Theory of operation. The transit sits between the node (broker, calls, serving) and one
transport. Going down, it turns calls, answers, events and stream chunks into packets and
hands the bytes to the transport. Coming up, the transport gives it frames, peers up / down
and stream frames; it decodes packets and: settles pending calls (``Pending``, one per call in
flight, woken once), admits REQs (node-wide ``max_pending_requests``, a fair share per peer,
``max_peer_streams``) and runs them in the handler pool through the action's ``serve``
pipeline (``nerve._serving``) under the caller's budget, answers them, updates the registry
from INFO / HEARTBEAT / DISCONNECT, and routes stream frames to readers and credit to writers.

It knows no sockets (the transport does), no service code (``spec.serve`` runs it) and not the
Broker: it is handed a :class:`NodePort`.
"""

from __future__ import annotations

import math
from time import perf_counter
import os
import re
import platform
import socket
import time
from collections import deque
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import trio

from nerve._cpu import CpuMeter
from nerve._deadline import effective_deadline
from nerve._metering import CANCELLED, CallSlot, Meter, error_kind
from nerve._timers import DeadlineQueue
from nerve.context import Context
from nerve.errors import (
    BrokerDisconnectedError,
    BrokerOptionsError,
    NerveError,
    ProtocolError,
    QueueIsFullError,
    RequestRejectedError,
    RequestSkippedError,
    RequestTimeoutError,
    SerializationError,
    ServiceNotFoundError,
    StreamError,
    error_from_wire,
    error_to_wire,
    request_timeout,
)
from nerve.frames import STREAM_FLAG_END, STREAM_FLAG_ERROR, STREAM_FLAG_RESPONSE
from nerve.packets import (
    UNSET,
    Disconnect,
    Discover,
    Event,
    Heartbeat,
    Info,
    Packet,
    PacketType,
    Ping,
    Pong,
    Request,
    Response,
)
from nerve.logs import node_logger
from nerve.statistics import TransitStatistics
from nerve.streams import PacketStream, StreamLink

if TYPE_CHECKING:
    from nerve._dispatch import HandlerPool
    from nerve.registry import ActionEndpoint, Registry
    from nerve.serializers import Serializer
    from nerve.service import ActionSpec
    from nerve.transports.base import Transport

__all__ = ["NodePort", "Transit"]


_REQ = int(PacketType.REQ)
_INF = float("inf")
#: REQ budgets at or beyond this (or not finite) mean no budget: 100 days, in ms
_MAX_BUDGET_MS = 100 * 86400 * 1000
_RES = int(PacketType.RES)
_EVENT = int(PacketType.EVENT)
#: a stream is named by its call's id in the stream frame header (one length byte)
_MAX_STREAM_ID = 255
#: Moleculer's default ``maxChunkSize``: larger chunks are split to it
_MOLECULER_MAX_CHUNK = 256 * 1024
#: room kept in a frame for a stream packet's other fields (ids, action, headers)
_PACKET_ROOM = 8192
_MAX_SEQ = 1 << 53
#: a node id that can name a bus subject (NATS): no whitespace, control character or wildcard
_BUS_ID = re.compile(r"[^\s\x00-\x1f\x7f*>.]+(?:\.[^\s\x00-\x1f\x7f*>.]+)*")
_HEARTBEAT = int(PacketType.HEARTBEAT)
_DISCOVER = int(PacketType.DISCOVER)
_INFO = int(PacketType.INFO)
_DISCONNECT = int(PacketType.DISCONNECT)


class Pending:
    """A call waiting for its RES: settled once, waking the one task that waits."""

    __slots__ = ("node_id", "settled", "answered", "result", "error", "meta", "task", "slot", "started")

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        #: the meter's slot of its action and when it was sent (metrics on), else None
        self.slot: CallSlot | None = None
        self.started = 0.0
        self.settled = False
        self.answered = False  # its RES arrived (perhaps after a timeout settled it)
        self.result: Any = None
        self.error: BaseException | None = None
        self.meta: dict[str, Any] | None = None
        self.task: Any = None

    def settle(self) -> None:
        self.settled = True
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def abort(self, _: Any) -> Any:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def wait(self) -> None:
        if self.settled:
            await trio.lowlevel.checkpoint()
            return
        self.task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self.abort)


class _RemoteLink(StreamLink):
    """A producer's chunks as STREAM_DATA frames to a peer."""

    def __init__(self, transit: Transit, node_id: str, stream_id: str, flags: int) -> None:
        self.transit = transit
        self.node_id = node_id
        self.stream_id = stream_id
        self.flags = flags

    def data(self, seq: int, chunk: Any) -> None:
        self.transit.transport.send_stream_data(self.node_id, self.flags, self.stream_id, seq, chunk)

    def end(self, seq: int) -> None:
        self.transit.transport.send_stream_data(self.node_id, self.flags | STREAM_FLAG_END,
                                                self.stream_id, seq, b"")

    def fail(self, exc: BaseException) -> None:
        body = self.transit.serializer.encode_value(error_to_wire(exc, self.transit.node_id))
        try:
            self.transit.transport.send_stream_data(self.node_id, self.flags | STREAM_FLAG_ERROR,
                                                    self.stream_id, 0, body)
        except NerveError:
            pass

    def has_room(self, n: int) -> bool:
        return self.transit.transport.has_room(self.node_id, n)

    async def reserve(self, n: int) -> Any:
        return await self.transit.transport.reserve(self.node_id, n)

    def release(self, token: Any, n: int) -> None:
        self.transit.transport.release(token, n)

    async def wait_ready(self, n: int) -> None:
        await self.transit.transport.wait_ready(self.node_id, n)


class _MoleculerLink(_RemoteLink):
    """A producer's chunks as Moleculer's stream packets, for a node that reads no stream
    frames of nerve's (a moleculer.js node): REQ ``params`` / RES ``data`` numbered from
    ``seq`` 1 (the packet that opened the stream was 0), then a packet with ``stream: false``
    (the end, or the error). Moleculer's streams have no flow control: what the transport
    took counts as read, so the producer is paced by the transport's queue alone."""

    def __init__(self, transit: Transit, node_id: str, stream_id: str, template: Request | Response) -> None:
        super().__init__(transit, node_id, stream_id, 0)
        self.template = template
        self.kind = _RES if isinstance(template, Response) else _REQ
        self.seq = 0  # the last Moleculer seq sent
        self.sent = 0
        self.stream: PacketStream | None = None

    def _send(self, **fields: Any) -> None:
        transit = self.transit
        packet = msgspec.structs.replace(self.template, **fields)
        transit.transport.send(self.node_id, self.kind, transit.serializer.encode(packet))
        transit.packets_sent += 1

    def data(self, seq: int, chunk: Any) -> None:
        self.seq = seq + 1
        if self.kind == _REQ:
            self._send(seq=self.seq, stream=True, params=chunk)
        else:
            self._send(seq=self.seq, stream=True, data=chunk)
        self.sent += len(chunk)
        if self.stream is not None:
            self.stream.on_credit(self.sent)

    def end(self, seq: int) -> None:
        self.seq += 1
        self._send(seq=self.seq, stream=False)

    def fail(self, exc: BaseException) -> None:
        transit = self.transit
        plain = error_to_wire(exc, transit.node_id)
        self.seq += 1
        try:
            if self.kind == _RES:
                self._send(seq=self.seq, stream=False, success=False, error=plain)
            elif transit.v5:  # where each version of moleculer.js looks for it
                self._send(seq=self.seq, stream=False, headers={"$streamError": plain})
            else:
                self._send(seq=self.seq, stream=False, meta={"$streamError": plain})
        except NerveError:
            pass


class _StreamSlots:
    """The request streams we may have open at once towards one node (the number it said
    it serves per peer): calls beyond it wait here, in order, instead of being refused."""

    __slots__ = ("limit", "used", "waiters", "error")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.waiters: deque[Any] = deque()
        self.error: BaseException | None = None

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.error is not None:
            raise self.error
        if self.used < self.limit and not self.waiters:
            self.used += 1
            return
        task = trio.lowlevel.current_task()
        self.waiters.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.waiters.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)  # woken holding a slot (or failed)
        if self.error is not None:
            raise self.error

    def release(self) -> None:
        if self.waiters and self.error is None:
            trio.lowlevel.reschedule(self.waiters.popleft())  # the slot passes on
        else:
            self.used -= 1

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        while self.waiters:
            trio.lowlevel.reschedule(self.waiters.popleft())


class _Countdown:
    """Calls ``fn`` once every one of ``parts`` parts is done (each part is a callable that
    counts once however often it is called)."""

    __slots__ = ("left", "fn")

    def __init__(self, parts: int, fn: Callable[[], None]) -> None:
        self.left = parts
        self.fn = fn

    def part(self) -> Callable[[], None]:
        done = False

        def finish() -> None:
            nonlocal done
            if not done:
                done = True
                self.left -= 1
                if self.left == 0:
                    self.fn()

        return finish


def _when_closed(stream: PacketStream, fn: Callable[[], None]) -> None:
    """Run ``fn`` once the producer side of ``stream`` is over (now, if it already is)."""
    if stream.producer_done:
        fn()
    else:
        stream.add_closed_callback(fn)


class NodePort(Protocol):
    """What the transit needs of the node above it (the broker hands it one; the transit never
    sees the Broker). Settings are plain attributes, fixed once the node is created."""

    node_id: str
    namespace: str
    metadata: dict[str, Any]
    #: what handlers' contexts call through (``ctx.call``): opaque to the transit
    api: Any
    registry: Registry
    handlers: HandlerPool
    stream_window: int
    max_chunk: int
    stream_idle_timeout: float | None
    max_pending_requests: int
    max_peer_requests: int | None
    max_peer_streams: int
    #: bytes a stream from a producer without flow control (Moleculer's) may hold unread
    max_stream_buffer: int
    #: Moleculer's ``disableBalancer``: calls and events go through the bus's queue groups
    disable_balancer: bool
    heartbeat_interval: float
    heartbeat_timeout: float
    #: the node's ``nerve._metering.Meter`` when metrics are on, else None
    meter: Meter | None

    def local_action(self, name: str) -> ActionSpec | None:
        """The action ``name`` served here (its ``serve`` runs it), or None."""

    def describe_services(self) -> list[dict[str, Any]]:
        """This node's services as INFO describes them."""

    def event_received(self, sender: str, pkt: Event) -> None:
        """An EVENT packet for this node's handlers."""

    def node_event(self, name: str, node_id: str, *, unexpected: bool) -> None:
        """``$node.connected`` / ``$node.disconnected``."""

    def services_changed(self) -> None:
        """The cluster's services changed (a node came, went or told its services)."""

    def watch_stream(self, ctx: Context | None, stream: PacketStream) -> None:
        """A call's stream on this node: the middlewares' stream hooks are told of its chunks."""

    def action_failed(self, ctx: Context, exc: BaseException) -> None:
        """A handler of this node failed serving a peer's request (it is logged once, there)."""


class Transit:
    """Packets to and from the node; see the module's docstring."""

    def __init__(self, node: NodePort, transport: Transport, serializer: Serializer, *,
                 protocol_version: str = "5") -> None:
        self.node = node
        self.handlers = node.handlers
        self.heartbeat_interval = node.heartbeat_interval
        self.heartbeat_timeout = node.heartbeat_timeout
        self.stream_config = (node.stream_window, node.max_chunk)
        self._cpu = CpuMeter()
        self.transport = transport
        self.serializer = serializer
        self.node_id = node.node_id
        self.meter = node.meter
        self.log = node_logger("nerve.transit", node.node_id)
        self.namespace = node.namespace
        self.ver = protocol_version
        self.v5 = protocol_version != "4"
        self.pending: dict[str, Pending] = {}
        self.readers: dict[tuple[str, str, bool], PacketStream] = {}
        self.writers: dict[tuple[str, str, bool], PacketStream] = {}
        self.serving: dict[tuple[str, str], trio.CancelScope] = {}
        #: requests (and, of them, request streams) being served per peer
        self.peer_requests: dict[str, int] = {}
        #: (peer, call id) of every request admitted and not yet answered (response stream
        #: included): an id reused meanwhile is a protocol error
        self.in_service: set[tuple[str, str]] = set()
        #: stream requests whose CANCEL came before their handler started
        self._cancel_early: set[tuple[str, str]] = set()
        self.peer_streams: dict[str, int] = {}
        #: nodes connected now (as the transport reports them)
        self.peers: set[str] = set()
        #: peer_request_limit(), kept up to date as peers come and go (read per request)
        self._peer_limit = node.max_peer_requests or node.max_pending_requests
        self._pongs: dict[str, trio.Event] = {}
        self._slots: dict[str, _StreamSlots] = {}
        #: stream calls we gave up on, waiting for their late RES to free their slot
        self._late: dict[tuple[str, str], Callable[[], None]] = {}
        #: what to call when a reader leaves ``readers`` (its stream is over for us)
        self._reader_done: dict[tuple[str, str, bool], Callable[[], None]] = {}
        #: call timeouts (the broker runs ``timers.run``)
        self.timers = DeadlineQueue()
        self.instance_id = os.urandom(8).hex()
        self.info_seq = 1
        me = node.registry.nodes.get(self.node_id)
        if me is not None:  # our own entry ($node.list), as our INFO tells peers
            me.instance_id = self.instance_id
            me.hostname = socket.gethostname()
            me.ip_list = list(local_ip_list())
            me.client = _client_info()
            me.metadata = dict(node.metadata)
            me.seq = self.info_seq
        # Counters (see nerve.statistics.TransitStatistics): plain attributes, bumped inline.
        self.packets_sent = 0
        self.packets_received = 0
        self.requests_sent = 0
        self.requests_received = 0
        self.requests_rejected = 0
        self.requests_failed = 0
        #: REQs whose handler was started (received minus refused, minus dropped at a stop)
        self.requests_served = 0
        #: stream requests whose handler was ended by the caller's abort (not a failure)
        self._caller_aborted: set[tuple[str, str]] = set()
        self.cancelled = 0
        self.protocol_errors = 0
        self.events_sent = 0
        self.events_received = 0
        #: set by the node once it stops taking calls (REQs are refused from then on)
        self.stopping = False

    # --- outgoing -----------------------------------------------------------------------

    def send_packet(self, node_id: str, packet: Packet) -> None:
        self.transport.send(node_id, int(packet.kind), self.serializer.encode(packet))
        self.packets_sent += 1

    def broadcast_packet(self, packet: Packet) -> None:
        self.transport.broadcast(int(packet.kind), self.serializer.encode(packet))
        self.packets_sent += 1

    def statistics(self) -> TransitStatistics:
        return TransitStatistics(
            packets_sent=self.packets_sent, packets_received=self.packets_received,
            requests_sent=self.requests_sent, requests_received=self.requests_received,
            requests_rejected=self.requests_rejected, requests_failed=self.requests_failed,
            requests_waiting=len(self.pending), requests_in_service=len(self.in_service),
            cancelled=self.cancelled, protocol_errors=self.protocol_errors,
            events_sent=self.events_sent, events_received=self.events_received,
            streams_reading=len(self.readers), streams_writing=len(self.writers), peers=len(self.peers))

    def info_packet(self) -> Info:
        return Info(
            ver=self.ver,
            sender=self.node_id,
            services=self.node.describe_services(),
            config={},
            ip_list=list(local_ip_list()),
            hostname=socket.gethostname(),
            client=_client_info(),
            instance_id=self.instance_id,
            metadata=dict(self.node.metadata),
            seq=self.info_seq,
            nerve={"streams": {"window": self.stream_config[0], "maxChunk": self.stream_config[1],
                               "maxStreams": self.node.max_peer_streams}}
            if self.transport.bus_streams else UNSET,
        )

    # --- what transports ask (transports.base.Upstream) ------------------------------------

    def heartbeat_frame(self) -> tuple[int, bytes]:
        cpu = round(self._cpu.percent())
        me = self.node.registry.nodes.get(self.node_id)
        if me is not None:
            me.cpu = cpu  # our own node, as peers see it (the cpu strategy reads it)
        self.packets_sent += 1
        return _HEARTBEAT, self.serializer.encode(Heartbeat(ver=self.ver, sender=self.node_id, cpu=cpu))

    def balance(self) -> None:
        """Balanced mode: serve our actions and event groups through the bus's queue groups
        (Moleculer subscribes every action of the node and every (group, event) it listens to)."""
        if not self.node.disable_balancer:
            return
        actions: list[str] = []
        events: list[tuple[str, str]] = []
        for svc in self.node.describe_services():
            actions.extend(a for a in (svc.get("actions") or {}))
            for name, definition in (svc.get("events") or {}).items():
                group = definition.get("group") if isinstance(definition, dict) else None
                events.append((group or svc.get("name") or "", name))
        self.transport.set_balanced(actions, events)

    def greeting_frames(self) -> list[tuple[int, bytes]]:
        self.balance()
        self.packets_sent += 2
        return [(_DISCOVER, self.serializer.encode(Discover(ver=self.ver, sender=self.node_id))),
                (_INFO, self.serializer.encode(self.info_packet()))]

    def on_bus_frame(self, kind: int, payload: bytes) -> None:
        """A frame from a bus transport: its sender is in the packet (decoded once, here)."""
        try:
            pkt = self.serializer.decode(kind, payload)
        except ProtocolError:
            self.protocol_errors += 1
            raise
        self.packets_received += 1
        sender = pkt.sender
        if not sender or not isinstance(sender, str):
            return
        if not _BUS_ID.fullmatch(sender) or len(sender.encode("utf-8", "surrogatepass")) > 255:
            # Our answers name their subject after it: a space or a line break would inject into
            # the bus's protocol, a wildcard would reach other nodes.
            self.protocol_errors += 1
            raise ProtocolError(f"a {PacketType(kind).name} from a sender that cannot be a node id on a "
                                f"bus: {sender[:80]!r}", reason="bad_sender")
        if sender == self.node_id:
            # Our own packets come back from the bus; in balanced mode a queue group may give
            # us our own REQ / EVENT (and so our own RES), as Moleculer handles them.
            if self.node.disable_balancer and kind in (_REQ, _RES, _EVENT):
                self._on_packet(sender, kind, pkt)
            return
        if self.transport.seen(sender, kind) and kind not in (_INFO, _DISCONNECT):
            # A node we do not know yet (or lost): ask for its INFO.
            self.send_packet(sender, Discover(ver=self.ver, sender=self.node_id))
        self._on_packet(sender, kind, pkt)

    def send_event(self, node_id: str, event_id: str, event: str, data: Any, groups: list[str] | None,
                   broadcast: bool, meta: dict[str, Any], parent: Context | None,
                   headers: dict[str, Any] | None = None) -> None:
        """An EVENT packet to ``node_id`` (``parent``: the context it is a child of)."""
        self.send_packet(node_id, Event(
            ver=self.ver, sender=self.node_id, id=event_id, event=event, data=data, groups=groups,
            broadcast=broadcast, meta=meta, headers=(headers or {}) if self.v5 else UNSET,
            level=parent.level + 1 if parent is not None else 1,
            tracing=parent.tracing if parent is not None else None,
            parent_id=parent.id if parent else None, request_id=parent.request_id if parent else None,
            caller=parent.service if parent else None, need_ack=False))
        self.events_sent += 1

    def send_balanced_event(self, event_id: str, event: str, data: Any, group: str, meta: dict[str, Any],
                            parent: Context | None, headers: dict[str, Any] | None = None) -> None:
        """Balanced mode: an EVENT for one listener of ``group``, whichever node the bus picks."""
        payload = self.serializer.encode(Event(
            ver=self.ver, sender=self.node_id, id=event_id, event=event, data=data, groups=[group],
            broadcast=False, meta=meta, headers=(headers or {}) if self.v5 else UNSET,
            level=parent.level + 1 if parent is not None else 1,
            tracing=parent.tracing if parent is not None else None,
            parent_id=parent.id if parent else None, request_id=parent.request_id if parent else None,
            caller=parent.service if parent else None, need_ack=False))
        self.transport.send_balanced_event(group, event, payload)
        self.packets_sent += 1
        self.events_sent += 1

    def announce(self) -> None:
        """Tell every connected node our (changed) services."""
        self.info_seq += 1
        me = self.node.registry.nodes.get(self.node_id)
        if me is not None:
            me.seq = self.info_seq
        self.balance()
        try:
            self.broadcast_packet(self.info_packet())
        except NerveError as exc:  # pragma: no cover - broadcast skips gone peers
            self.log.debug("announce failed: %r", exc)

    def send_request(self, ep: ActionEndpoint, call_id: str, params: Any, meta: dict[str, Any],
                     headers: dict[str, Any], level: int, request_id: str, parent_id: str | None,
                     caller: str | None, *, timeout: float | None = None, stream: bool = False,
                     tracing: bool | None = None, seq: int | None = None, targeted: bool = False) -> Pending:
        """Send a REQ and register its Pending (the caller waits for it and unregisters it).
        Takes the call's fields rather than a Context: a remote call needs no Context here.

        Raises RequestSkippedError, without sending, when the call has no budget left. In
        balanced mode a call without a stream that was not ``targeted`` at a node (``node_id=``)
        goes to the bus's queue group for its action."""
        node_id = ep.node_id
        budget = _budget_ms(timeout)
        if budget < 0:
            raise RequestSkippedError(f"Calling '{ep.name}' is skipped because timeout reached.",
                                      data={"action": ep.name, "nodeID": node_id}, node_id=self.node_id)
        payload = self.serializer.encode(Request(
            ver=self.ver, sender=self.node_id, id=call_id, action=ep.name, params=params,
            meta=meta, headers=headers if self.v5 else UNSET, timeout=budget, level=level,
            tracing=tracing, parent_id=parent_id, request_id=request_id, caller=caller, stream=stream,
            seq=UNSET if seq is None else seq,
        ))
        balanced = self.node.disable_balancer and not stream and not targeted
        # Balanced: the bus's queue group picks the node, and any node may answer ("").
        pending = Pending("" if balanced else node_id)
        self.pending[call_id] = pending  # before sending: an in-process answer comes at once
        try:
            if balanced:
                self.transport.send_balanced_request(ep.name, payload)
            else:
                self.transport.send(node_id, _REQ, payload)
        except BaseException:
            del self.pending[call_id]
            raise
        self.requests_sent += 1
        self.packets_sent += 1
        if self.meter is not None:
            slot = ep.slot
            if slot is None:
                slot = ep.slot = self.meter.remote_slot(ep.name)
            pending.slot = slot
            slot.total += 1
            slot.active += 1
            pending.started = perf_counter()
        return pending

    def _metered_done(self, pending: Pending) -> None:
        """A metered call stopped waiting: its time, and its error if it has one (a call that
        stopped waiting unsettled was cancelled by its caller)."""
        slot = pending.slot
        if slot is None:
            return
        pending.slot = None
        slot.active -= 1
        slot.observe(perf_counter() - pending.started)
        if pending.error is not None or not pending.settled:
            slot.failed_as(error_kind(pending.error) if pending.error is not None else CANCELLED)

    async def request(self, ep: ActionEndpoint, ctx: Context, *, timeout: float | None,
                      stream: PacketStream) -> Pending:
        """Send a REQ with a request stream to ``ep``'s node, stream it, and wait for the RES
        (settled in the returned Pending). Calls without a stream take the flattened path in
        ``Broker.call``.

        ``timeout`` bounds the wait for the response and starts when the stream ends, so a
        long upload is never cut by it (the stream's idle timeout is).
        """
        node_id = ep.node_id
        aborted = stream.abort_before_bind
        if aborted is not None:  # aborted before any call took it: send nothing
            await trio.lowlevel.checkpoint()
            raise aborted
        native = self.transport.streams_native(node_id)
        params = ctx.params
        if not native and not self.v5:
            # Moleculer 0.14: the stream *is* the params; a REQ has no room for others.
            if params not in (None, {}):
                await trio.lowlevel.checkpoint()
                raise BrokerOptionsError(
                    f"'{ep.name}' is called with a stream over protocol v4 (moleculer.js 0.14), "
                    "where the stream is the call's params: pass the other values in meta")
            params = None
        slots = await self._stream_slot(node_id, timeout if timeout is not None else stream.idle_timeout)
        try:
            # (No budget in a Moleculer stream's REQ: moleculer.js would cut the upload with it,
            # where nerve's timeout starts once the stream has ended; this side still bounds it.)
            pending = self.send_request(ep, ctx.id, params, ctx.meta, ctx.headers, ctx.level,
                                        ctx.request_id, ctx.parent_id, ctx.caller,
                                        timeout=timeout if native else None,
                                        stream=True, tracing=ctx.tracing, seq=None if native else 0)
        except BaseException:
            if slots is not None:
                slots.release()
            raise
        key = (node_id, ctx.id, False)
        try:
            with trio.CancelScope() as scope:
                if stream.idle_timeout is None:
                    stream.idle_timeout = self.node.stream_idle_timeout
                if native:
                    window, max_chunk = self.transport.peer_stream_config(node_id)
                    stream.bind_producer(_RemoteLink(self, node_id, ctx.id, 0), window, max_chunk)
                else:
                    window, max_chunk = self.moleculer_stream_config()
                    link = _MoleculerLink(self, node_id, ctx.id, Request(
                        ver=self.ver, sender=self.node_id, id=ctx.id, action=ep.name, params=None,
                        meta={}, headers={} if self.v5 else UNSET, level=ctx.level,
                        request_id=ctx.request_id, parent_id=ctx.parent_id, caller=ctx.caller))
                    stream.bind_producer(link, window, max_chunk)
                    link.stream = stream
                self.writers[key] = stream
                stream.add_closed_callback(lambda: self._forget_writer(key))
                if timeout is not None:
                    stream.add_closed_callback(
                        lambda: setattr(scope, "deadline", trio.current_time() + timeout))
                if stream.has_source:
                    # In the background: a streaming answer (a transform) may arrive
                    # before the request stream ends, and the caller reads it meanwhile.
                    self.handlers.start_soon(stream.pump)
                await pending.wait()
            if scope.cancelled_caught and not pending.settled:
                pending.error = request_timeout(ep.name, node_id)
        finally:
            del self.pending[ctx.id]
            if pending.slot is not None:
                self._metered_done(pending)
            if not stream.producer_done and not isinstance(pending.result, PacketStream):
                self.writers.pop(key, None)
                stream.abort_untaken(StreamError("the call ended before its request stream did"))
            elif not pending.answered:
                self._cancel_remote(node_id, ctx.id)
            if slots is not None:
                # The node counts this stream until its answer (and its response stream) is
                # out and our request stream is over; we hold the slot until we have seen all
                # of that, which is never before the node let go of it.
                response = (node_id, ctx.id, True)
                streaming = isinstance(pending.result, PacketStream) and response in self.readers
                countdown = _Countdown(1 + streaming + (not pending.answered), slots.release)
                _when_closed(stream, countdown.part())
                if streaming:
                    self._reader_done[response] = countdown.part()
                if not pending.answered:
                    # We gave up (timeout, cancel): the node counts the call until it answers,
                    # which it always does (an aborted stream fails its handler).
                    self._late[(node_id, ctx.id)] = countdown.part()
        return pending

    async def _stream_slot(self, node_id: str, wait: float | None) -> _StreamSlots | None:
        """Wait (up to ``wait`` seconds) for one of the request-stream slots ``node_id`` gives
        us (None: no limit); QueueIsFullError (retryable: nothing was sent) after that."""
        slots = self._slots.get(node_id)
        if slots is None:
            limit = self.transport.peer_max_streams(node_id)
            if limit <= 0:
                await trio.lowlevel.checkpoint()
                return None
            slots = self._slots[node_id] = _StreamSlots(limit)
        with trio.move_on_after(wait if wait is not None else _INF):
            await slots.acquire()
            return slots
        raise QueueIsFullError(
            f"no request-stream slot on '{node_id}' within {wait:g}s: it serves {slots.limit} of "
            "ours at once and none ended", data={"nodeID": node_id, "size": slots.limit})

    def expire_at(self, pending: Pending, due: float, action: str) -> int:
        """Settle ``pending`` with RequestTimeoutError at ``due`` (trio clock) unless it is
        settled first; returns the key for ``timers.discard(key, pending)``."""

        def expire() -> None:
            if not pending.settled:
                pending.error = request_timeout(action, pending.node_id)
                pending.settle()

        return self.timers.add(due, pending, expire)

    async def wait_response(self, call_id: str, pending: Pending, due: float, action: str) -> None:
        """Wait until ``pending`` (sent by :meth:`send_request`) is settled: its RES, its node
        gone, or ``due`` (trio clock; inf: no timeout) passed. Unregisters it."""
        expiry = None if due == _INF else self.expire_at(pending, due, action)
        try:
            if pending.settled:
                await trio.lowlevel.checkpoint()
            else:
                pending.task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(pending.abort)
        finally:
            self.done_waiting(call_id, pending, expiry)

    def done_waiting(self, call_id: str, pending: Pending, expiry: int | None) -> None:
        """The caller of ``pending`` stopped waiting (settled, or cancelled): unregister it, drop
        its timer and, if it was never answered, tell its node (CANCEL). The flat lane of
        ``nerve._calls`` waits inline (``expire_at``, park on ``pending.task``, then this)."""
        del self.pending[call_id]
        if pending.slot is not None:
            self._metered_done(pending)
        if expiry is not None:
            self.timers.discard(expiry, pending)
        if not pending.answered and (not pending.settled or isinstance(pending.error, RequestTimeoutError)):
            self._cancel_remote(pending.node_id, call_id)

    def _cancel_remote(self, node_id: str, call_id: str) -> None:
        """We stopped waiting for ``call_id`` (cancelled, or our timeout fired): the callee's
        handler is cancelled where the transport can say so (CANCEL frame)."""
        if not node_id:  # a balanced call: no node to tell
            return
        try:
            self.transport.send_cancel(node_id, call_id)
        except NerveError:
            pass

    def on_cancel(self, sender: str, call_id: str) -> None:
        """``sender`` stopped waiting for its call ``call_id``: cancel its handler if it is still
        running here (a handler with a request stream fails it: the caller gets its answer)."""
        key = (sender, call_id)
        scope = self.serving.get(key)
        if scope is not None:
            scope.cancel()
            self.cancelled += 1
        elif self.handlers.cancel(key):
            self.cancelled += 1
        elif key in self.in_service and (sender, call_id, False) in self.readers:
            # A stream handler still queued: cancelled as it starts (it answers, failing its
            # stream, so the caller frees its slot).
            self._cancel_early.add(key)
            self.cancelled += 1

    async def ping(self, node_id: str, timeout: float) -> float:
        """Round-trip time to ``node_id`` in seconds (PING / PONG packets)."""
        ping_id = os.urandom(8).hex()
        waiter = self._pongs[ping_id] = trio.Event()
        start = trio.current_time()
        try:
            self.send_packet(node_id, Ping(ver=self.ver, sender=self.node_id, time=_now_ms(), id=ping_id))
            with trio.move_on_after(timeout):
                await waiter.wait()
                return trio.current_time() - start
        finally:
            del self._pongs[ping_id]
        raise RequestTimeoutError(f"no PONG from '{node_id}' within {timeout}s", data={"nodeID": node_id})

    # --- incoming -----------------------------------------------------------------------

    def on_connected(self, node_id: str) -> None:
        self.peers.add(node_id)
        self._peer_limit = self.peer_request_limit()
        try:
            self.send_packet(node_id, self.info_packet())
        except NerveError as exc:
            self.log.debug("cannot greet %s: %r", node_id, exc)

    def on_disconnected(self, node_id: str, *, graceful: bool) -> None:
        """Everything ``node_id`` held is let go: its calls fail, its streams fail and drop what
        they buffered, the handlers reading its request streams are cancelled."""
        self.peers.discard(node_id)
        self._peer_limit = self.peer_request_limit()
        was = self.node.registry.node_gone(node_id)
        reason = "disconnected" if graceful else "was lost"
        slots = self._slots.pop(node_id, None)
        if slots is not None:
            slots.fail(BrokerDisconnectedError(f"node '{node_id}' {reason}", data={"nodeID": node_id}))
        for late_key in [k for k in self._late if k[0] == node_id]:
            del self._late[late_key]
        for serving_key, scope in list(self.serving.items()):
            if serving_key[0] == node_id:
                scope.cancel()
        for call in [k for k in self.in_service if k[0] == node_id]:
            # Nobody will read their answers: as if the caller had cancelled them (a stream
            # handler still queued is cancelled as it starts).
            if not self.handlers.cancel(call) and (node_id, call[1], False) in self.readers:
                self._cancel_early.add(call)
        for pending in list(self.pending.values()):
            if pending.node_id == node_id and not pending.settled:
                pending.error = RequestRejectedError(
                    f"Request is rejected when call action: node '{node_id}' {reason}.",
                    data={"nodeID": node_id}, node_id=node_id)
                pending.settle()
        for key, reader in list(self.readers.items()):
            if key[0] == node_id:
                self._pop_reader(key)
                reader.discard(StreamError(f"the stream's producer node '{node_id}' {reason}",
                                            data={"nodeID": node_id}))
        for key, writer in list(self.writers.items()):
            if key[0] == node_id:
                self.writers.pop(key, None)
                writer.fail_producer(StreamError(f"the stream's reader node '{node_id}' {reason}",
                                                  data={"nodeID": node_id}))
        if was:
            self.log.info("node %s %s", node_id, reason, extra={"peer": node_id})
            self.node.node_event("$node.disconnected", node_id, unexpected=not graceful)

    def on_frame(self, sender: str, kind: int, payload: bytes) -> None:
        """Handle one frame from ``sender``; raises ProtocolError for a malformed packet."""
        try:
            pkt = self.serializer.decode(kind, payload)
        except ProtocolError:
            self.protocol_errors += 1
            raise
        self.packets_received += 1
        if pkt.ver == self.ver:  # the two hot kinds without one more frame
            if kind == _RES:
                self._on_response(sender, pkt)  # type: ignore[arg-type]
                return
            if kind == _REQ:
                self._on_request(sender, pkt)  # type: ignore[arg-type]
                return
        self._on_packet(sender, kind, pkt)

    def _on_packet(self, sender: str, kind: int, pkt: Packet) -> None:
        if pkt.ver != self.ver:
            self.log.warning("dropping %s from %s: protocol version %r, expected %r",
                        PacketType(kind).name, sender, pkt.ver, self.ver)
            return
        if kind == _REQ:
            self._on_request(sender, pkt)  # type: ignore[arg-type]
        elif kind == _RES:
            self._on_response(sender, pkt)  # type: ignore[arg-type]
        elif isinstance(pkt, Event):
            self.events_received += 1
            self.node.event_received(sender, pkt)
        elif isinstance(pkt, Info):
            self._on_info(sender, pkt)
        elif isinstance(pkt, Discover):
            self.send_packet(sender, self.info_packet())
        elif isinstance(pkt, Heartbeat):
            node = self.node.registry.nodes.get(sender)
            if node is None or not node.available:
                self.send_packet(sender, Discover(ver=self.ver, sender=self.node_id))
            else:
                node.cpu = pkt.cpu if isinstance(pkt.cpu, (int, float)) else None
                node.last_seen = time.monotonic()  # the registry's clock
        elif isinstance(pkt, Disconnect):
            self.on_disconnected(sender, graceful=True)
        elif isinstance(pkt, Ping):
            self.send_packet(sender, Pong(ver=self.ver, sender=self.node_id, time=pkt.time, id=pkt.id,
                                         arrived=_now_ms()))
        elif isinstance(pkt, Pong):
            waiter = self._pongs.get(str(pkt.id))
            if waiter is not None:
                waiter.set()

    def _on_info(self, sender: str, pkt: Info) -> None:
        if sender == self.node_id:
            if pkt.instance_id != self.instance_id:
                self.log.error("another node uses our node id %r", sender)
            return
        services = [s for s in (pkt.services or []) if isinstance(s, dict)]
        if self.transport.bus_streams:
            self.transport.set_peer_streams(sender, _stream_offer(pkt.nerve))
        fresh = self.node.registry.update_node(
            sender, services=services, instance_id=pkt.instance_id or None,
            seq=pkt.seq if isinstance(pkt.seq, int) else None,
            hostname=pkt.hostname or None, ip_list=pkt.ip_list or None,
            client=pkt.client or None, metadata=pkt.metadata or None,
            address=self.transport.peer_address(sender))
        if fresh:
            self.log.info("node %s connected", sender, extra={"peer": sender})
            self.node.node_event("$node.connected", sender, unexpected=False)
        self.node.services_changed()

    def _on_request(self, sender: str, pkt: Request) -> None:
        if pkt.seq not in (UNSET, None, 0):
            if self.transport.native_streams:
                self.requests_received += 1
                raise ProtocolError(f"{sender} sent a Moleculer stream chunk (seq {pkt.seq}) on a native "
                                    "transport; streams travel as STREAM_DATA frames here",
                                    reason="unexpected_stream_packet")
            self._on_stream_packet(sender, pkt, pkt.id, False)
            return
        self.requests_received += 1
        if pkt.stream and ((sender, pkt.id, False) in self.readers
                           or (sender, pkt.id, False) in self._reader_done):
            raise ProtocolError(f"{sender} reused the id of a request stream in progress: {pkt.id[:80]!r}",
                                reason="stream_id_reused")
        if (sender, pkt.id) in self.in_service and (self.transport.native_streams or pkt.stream):
            # (Over Moleculer transports a retry may resend a context's id while its first
            # attempt still runs, as moleculer.js does: tolerated there, where no stream is
            # named by it.)
            # Its answer (or response stream) would be confused with the other's (and a stream
            # request's handler with the other's, whatever the transport).
            raise ProtocolError(f"{sender} reused the id of a request in progress: {pkt.id[:80]!r}",
                                reason="request_id_reused")
        node = self.node
        handlers = self.handlers
        spec = node.local_action(pkt.action)
        mine = self.peer_requests.get(sender, 0)
        if (spec is None or self.stopping or handlers.active >= node.max_pending_requests
                or mine >= self._peer_limit
                or (pkt.stream and self.peer_streams.get(sender, 0) >= node.max_peer_streams)):
            if spec is None:
                exc: NerveError = ServiceNotFoundError(
                    f"Service '{pkt.action}' is not found on '{self.node_id}' node.",
                    data={"action": pkt.action, "nodeID": self.node_id})
            elif self.stopping:
                exc = RequestRejectedError(f"node '{self.node_id}' is stopping",
                                           data={"action": pkt.action, "nodeID": self.node_id})
            elif mine >= self._peer_limit:
                exc = QueueIsFullError(
                    f"Queue is full: {mine} requests of '{sender}' are being served on "
                    f"'{self.node_id}' (its share of max_pending_requests={node.max_pending_requests}).",
                    data={"action": pkt.action, "nodeID": self.node_id, "size": mine})
            elif handlers.active < node.max_pending_requests:
                exc = QueueIsFullError(
                    f"Queue is full: {node.max_peer_streams} request streams of '{sender}' are being "
                    f"served on '{self.node_id}' (max_peer_streams).",
                    data={"action": pkt.action, "nodeID": self.node_id, "size": node.max_peer_streams})
            else:
                exc = QueueIsFullError(
                    f"Queue is full: {handlers.active} requests are being served on "
                    f"'{self.node_id}' (max_pending_requests={node.max_pending_requests}).",
                    data={"action": pkt.action, "nodeID": self.node_id, "size": handlers.active})
            self.requests_rejected += 1
            self._respond_error(sender, pkt.id, pkt.meta or {}, exc)
            return
        self.peer_requests[sender] = mine + 1
        self.in_service.add((sender, pkt.id))
        if not mine and not self.peers:  # a transport that reports no peers: count by requests
            self._peer_limit = self.peer_request_limit()
        if pkt.stream:
            # The stream counts until its answer is out and its reader is done with it.
            self.peer_streams[sender] = self.peer_streams.get(sender, 0) + 1
            # seq 0: Moleculer's stream packets follow (nerve's own frames carry no seq here)
            reader = self._make_reader(sender, pkt.id, response=False,
                                       uncredited=pkt.seq == 0 and not self.transport.native_streams)
            countdown = _Countdown(2, lambda: self._stream_served(sender))
            self._reader_done[(sender, pkt.id, False)] = countdown.part()
            handlers.start_soon(self._serve, sender, pkt, spec, reader, _INF, countdown.part())
            return
        timeout = pkt.timeout
        if isinstance(timeout, (int, float)) and 0 < timeout < _MAX_BUDGET_MS:
            # The handler runs under the caller's remaining budget (the worker's cancel scope
            # carries it, so trio.current_effective_deadline() and nested calls see it). Rounded
            # up to the millisecond: requests that arrive together mostly share one deadline,
            # and a worker skips re-setting its scope's deadline (3 us) when it is unchanged.
            deadline = math.ceil((trio.current_time() + timeout / 1000) * 1000) / 1000
            handlers.start_keyed((sender, pkt.id), deadline, self._serve, sender, pkt, spec, None, deadline)
        else:
            handlers.start_keyed((sender, pkt.id), _INF, self._serve, sender, pkt, spec, None)

    def peer_request_limit(self) -> int:
        """Requests one peer may have served at once: ``max_peer_requests``, or by default a
        fair share of ``max_pending_requests`` among the connected peers (all of it for one)."""
        node = self.node
        if node.max_peer_requests is not None:
            return node.max_peer_requests
        return max(1, node.max_pending_requests // max(1, len(self.peers), len(self.peer_requests)))

    def _answered(self, sender: str, call_id: str, stream_part: Callable[[], None] | None) -> None:
        """A request of ``sender`` is answered (its response stream too), or dropped."""
        self.in_service.discard((sender, call_id))
        if self._cancel_early:
            self._cancel_early.discard((sender, call_id))
        left = self.peer_requests.get(sender, 0) - 1
        if left > 0:
            self.peer_requests[sender] = left
        else:
            self.peer_requests.pop(sender, None)
            if not self.peers:
                self._peer_limit = self.peer_request_limit()
        if stream_part is not None:
            stream_part()

    def _stream_served(self, sender: str) -> None:
        left = self.peer_streams.get(sender, 0) - 1
        if left > 0:
            self.peer_streams[sender] = left
        else:
            self.peer_streams.pop(sender, None)

    async def _serve(self, sender: str, pkt: Request, spec: ActionSpec, reader: PacketStream | None,
                     deadline: float = _INF, stream_part: Callable[[], None] | None = None) -> None:
        """Run a handler for a REQ and answer it. ``deadline``: the one the handler pool runs
        it under (the REQ's budget), to tell the caller when the handler is cut by it.

        The request counts for its peer (``peer_requests``) until its answer is out, response
        stream included; ``stream_part`` is called then (its request stream's count)."""
        counted = True
        self.requests_served += 1
        try:
            ctx = Context(
                self.node.api, id=pkt.id, request_id=pkt.request_id or pkt.id,
                parent_id=pkt.parent_id or None, level=pkt.level or 1, caller=pkt.caller or None,
                node_id=sender, params=pkt.params, meta=pkt.meta or {}, headers=pkt.headers or {},
                stream=reader, action=pkt.action, service=spec.service.full_name,
            )
            if isinstance(pkt.tracing, bool):
                ctx.tracing = pkt.tracing
            slot = spec.slot
            if slot is not None:  # metrics on: counted inline (see nerve._metering)
                slot.total += 1
                slot.active += 1
                started = perf_counter()
            try:
                try:
                    if reader is None:
                        result = await spec.serve(ctx)
                    else:
                        self.node.watch_stream(ctx, reader)
                        result = await self._serve_scoped(sender, pkt, spec, ctx, reader)
                except BaseException as exc:
                    if slot is not None:
                        slot.failed(exc)
                    raise
                finally:
                    if slot is not None:
                        slot.active -= 1
                        slot.observe(perf_counter() - started)
            except trio.Cancelled:
                if trio.current_time() >= deadline:
                    self._respond_timeout(sender, pkt, ctx)
                raise
            except BaseExceptionGroup as group:
                # A nursery in the handler, cancelled: the Cancelled part goes on to the scope
                # that was cancelled (the worker's, for a budget); the rest is the caller's answer.
                cancelled, rest = group.split(trio.Cancelled)
                if rest is not None:
                    self.requests_failed += 1
                    self.node.action_failed(ctx, rest)
                    self._respond_error(sender, pkt.id, ctx.meta, rest)
                elif trio.current_time() >= deadline:
                    self._respond_timeout(sender, pkt, ctx)
                if cancelled is None:  # pragma: no cover - a group without Cancelled is an Exception
                    raise
                raise cancelled from None
            except Exception as exc:
                if self._caller_aborted and (sender, pkt.id) in self._caller_aborted:
                    self._caller_aborted.discard((sender, pkt.id))
                elif reader is None or exc is not reader.read_error:
                    # (A handler failing with its request stream's own error failed because
                    # the caller aborted that stream or went away: not the handler's failure.)
                    self.requests_failed += 1
                    self.node.action_failed(ctx, exc)
                if reader is not None:
                    self._finish_request_stream(sender, pkt.id, reader)
                self._respond_error(sender, pkt.id, ctx.meta, exc)
                return
            if isinstance(result, PacketStream) and len(pkt.id.encode("utf-8", "surrogatepass")) > _MAX_STREAM_ID:
                result.abort_untaken(StreamError("the call's id is too long to name a stream"))
                self._respond_error(sender, pkt.id, ctx.meta, StreamError(
                    f"'{pkt.action}' answered with a stream, but the call's id is longer than "
                    f"{_MAX_STREAM_ID} bytes and cannot name it"))
                return
            if isinstance(result, PacketStream):
                if result.size is not None:  # a file's: the reader can show progress
                    ctx.meta.setdefault("size", result.size)
                self.node.watch_stream(ctx, result)
                if reader is not None:
                    _when_closed(result, lambda: self._finish_request_stream(sender, pkt.id, reader))
                counted = False
                _when_closed(result, lambda: self._answered(sender, pkt.id, stream_part))
                if deadline == _INF:
                    await self._send_response_stream(sender, pkt.id, ctx.meta, result)
                else:  # out of the budget's reach: a call's timeout never bounds its transfer
                    self.handlers.start_soon(self._send_response_stream, sender, pkt.id, ctx.meta, result)
                return
            if reader is not None:
                self._finish_request_stream(sender, pkt.id, reader)
            unserializable = self._respond(sender, pkt.id, ctx.meta, result)
            if unserializable is not None:
                self.requests_failed += 1
                self.node.action_failed(ctx, unserializable)
                if slot is not None:  # its run was counted as a success: it was not
                    slot.failed(unserializable)
        finally:
            if counted:
                self._answered(sender, pkt.id, stream_part)

    def _respond_timeout(self, sender: str, pkt: Request, ctx: Context) -> None:
        exc = request_timeout(pkt.action, self.node_id, by=None)
        self.requests_failed += 1
        self.node.action_failed(ctx, exc)
        self._respond_error(sender, pkt.id, ctx.meta, exc)

    def fail_all_pending(self, reason: str) -> None:
        """Settle every waiting call with RequestRejectedError (the broker is stopping), and
        forget what peers held (handlers still queued are dropped with the broker's nursery)."""
        self.peer_requests.clear()
        self.in_service.clear()
        self._cancel_early.clear()
        self._caller_aborted.clear()
        self.peer_streams.clear()
        self._peer_limit = self.peer_request_limit()
        self._reader_done.clear()
        for pending in list(self.pending.values()):
            if not pending.settled:
                pending.error = RequestRejectedError(
                    f"Request is rejected: {reason}.", data={"nodeID": pending.node_id},
                    node_id=pending.node_id)
                pending.settle()

    def _finish_request_stream(self, sender: str, call_id: str, reader: PacketStream) -> None:
        """The handler is done with its request stream: stop the producer if it is not over."""
        self._pop_reader((sender, call_id, False))
        reader.end_reading(StreamError("the handler returned before reading the whole stream"))

    async def _serve_scoped(self, sender: str, pkt: Request, spec: ActionSpec, ctx: Context,
                            reader: PacketStream) -> Any:
        """A handler with a request stream: cancellable by an abort of that stream (and under
        no budget while the stream flows)."""
        key = (sender, pkt.id)
        scope = trio.CancelScope()
        self.serving[key] = scope
        if key in self._cancel_early:  # its CANCEL came while it was queued
            self._cancel_early.discard(key)
            scope.cancel()
        try:
            with scope:
                return await spec.serve(ctx)
            self._caller_aborted.add(key)  # a cancellation, not the handler's failure
            raise StreamError("the call's request stream was aborted by the caller")
        finally:
            del self.serving[key]

    def _respond(self, sender: str, call_id: str, meta: dict[str, Any], result: Any) -> SerializationError | None:
        """Answer with ``result``; one that cannot be serialized is answered with the
        SerializationError, which is returned (the handler's failure, for the caller to count)."""
        res = Response(ver=self.ver, sender=self.node_id, id=call_id, success=True, data=result,
                       meta=meta, headers={} if self.v5 else UNSET)
        try:
            payload = self.serializer.encode(res)
        except SerializationError as exc:
            self._respond_error(sender, call_id, meta, exc)
            return exc
        self._send_quietly(sender, _RES, payload)
        return None

    def _respond_error(self, sender: str, call_id: str, meta: dict[str, Any], exc: BaseException) -> None:
        plain = error_to_wire(exc, self.node_id)
        res = Response(ver=self.ver, sender=self.node_id, id=call_id, success=False, data=None,
                       error=plain, meta=meta, headers={} if self.v5 else UNSET)
        try:
            payload = self.serializer.encode(res)
        except SerializationError:
            plain["data"] = None
            try:
                payload = self.serializer.encode(msgspec.structs.replace(res, error=plain, meta={}))
            except SerializationError:
                plain = error_to_wire(SerializationError(f"unserializable error {exc!r}"), self.node_id)
                payload = self.serializer.encode(msgspec.structs.replace(res, error=plain, meta={}))
        self._send_quietly(sender, _RES, payload)

    def _send_quietly(self, node_id: str, kind: int, payload: bytes) -> None:
        try:
            self.transport.send(node_id, kind, payload)
            self.packets_sent += 1
        except BrokerDisconnectedError:
            self.log.debug("dropping a %s for %s: node gone", PacketType(kind).name, node_id)

    async def _send_response_stream(self, sender: str, call_id: str, meta: dict[str, Any],
                                    stream: PacketStream) -> None:
        native = self.transport.streams_native(sender)
        # seq 0 opens a Moleculer stream (its packets follow); nerve's frames need none
        res = Response(ver=self.ver, sender=self.node_id, id=call_id, success=True, data=None,
                       meta=meta, headers={} if self.v5 else UNSET, stream=True, seq=UNSET if native else 0)
        try:
            self.transport.send(sender, _RES, self.serializer.encode(res))
            self.packets_sent += 1
            if native:
                window, max_chunk = self.transport.peer_stream_config(sender)
            else:
                window, max_chunk = self.moleculer_stream_config()
        except BrokerDisconnectedError:
            stream.fail_producer(StreamError(f"node '{sender}' is gone"))
            return
        key = (sender, call_id, True)
        if stream.idle_timeout is None:  # a peer that reads nothing holds it no longer than this
            stream.idle_timeout = self.node.stream_idle_timeout
        if native:
            stream.bind_producer(_RemoteLink(self, sender, call_id, STREAM_FLAG_RESPONSE), window, max_chunk)
        else:
            link = _MoleculerLink(self, sender, call_id, Response(
                ver=self.ver, sender=self.node_id, id=call_id, success=True, data=None, meta={},
                headers={} if self.v5 else UNSET))
            stream.bind_producer(link, window, max_chunk)
            link.stream = stream
        self.writers[key] = stream
        _when_closed(stream, lambda: self._forget_writer(key))
        if stream.has_source:
            await stream.pump()

    def _on_response(self, sender: str, pkt: Response) -> None:
        if pkt.seq not in (UNSET, None, 0) and not self.transport.native_streams:
            self._on_stream_packet(sender, pkt, pkt.id, True)
            return
        pending = self.pending.get(pkt.id)
        if pending is None:
            late = self._late.pop((sender, pkt.id), None)
            if late is not None:  # the answer to a stream call we gave up on
                if pkt.success and pkt.stream:
                    # A response stream nobody will read: stop it first (it counts there until
                    # it ends), so the node lets go before it sees our next call.
                    try:
                        self.transport.send_stream_credit(sender, STREAM_FLAG_RESPONSE | STREAM_FLAG_END,
                                                          pkt.id, 0)
                    except NerveError:
                        pass
                late()
            return
        if pending.node_id != sender and pending.node_id:
            self.log.warning("ignoring RES for %s from %s (sent to %s)", pkt.id, sender, pending.node_id)
            return
        if pending.settled:  # timed out, its caller not yet back: it will see this
            pending.answered = True
            return
        pending.answered = True
        if isinstance(pkt.meta, dict) and pkt.meta:
            pending.meta = pkt.meta
        if not pkt.success:
            pending.error = error_from_wire(pkt.error, sender)
        elif pkt.stream:
            pending.result = reader = self._make_reader(
                sender, pkt.id, response=True, uncredited=pkt.seq == 0 and not self.transport.native_streams)
            self.node.watch_stream(None, reader)  # before its first chunk (the caller is not back yet)
        else:
            pending.result = pkt.data
        pending.settle()

    # --- streams ------------------------------------------------------------------------

    def _pop_reader(self, key: tuple[str, str, bool]) -> PacketStream | None:
        """The stream ``key`` is over for us (ended, failed, stopped, or its node went)."""
        reader = self.readers.pop(key, None)
        done = self._reader_done.pop(key, None)
        if done is not None:
            done()
        return reader

    def _forget_writer(self, key: tuple[str, str, bool]) -> None:
        self.writers.pop(key, None)

    def _make_reader(self, sender: str, stream_id: str, *, response: bool,
                     uncredited: bool = False) -> PacketStream:
        """A reader for ``sender``'s stream. ``uncredited``: its producer sends Moleculer's
        stream packets and takes no credit; the reader then holds at most
        ``max_stream_buffer`` bytes unread before the stream fails (StreamOverflowError)."""
        node = self.node
        if uncredited:
            bound = node.max_stream_buffer
            reader = PacketStream(window=bound, max_chunk=bound, idle_timeout=node.stream_idle_timeout)
            reader.uncredited = True
        else:
            reader = PacketStream(window=node.stream_window, max_chunk=node.max_chunk,
                                  idle_timeout=node.stream_idle_timeout)
        flags = STREAM_FLAG_RESPONSE if response else 0
        key = (sender, stream_id, response)

        def grant(consumed: int, stop: bool) -> None:
            if stop:
                self._pop_reader(key)
            if uncredited:
                return  # nobody to tell: a Moleculer producer has no flow control
            try:
                self.transport.send_stream_credit(sender, flags | (STREAM_FLAG_END if stop else 0),
                                                  stream_id, consumed)
            except BrokerDisconnectedError:
                pass

        reader.bind_reader(grant)
        self.readers[key] = reader
        return reader

    def on_stream_data(self, sender: str, flags: int, stream_id: str, seq: int, chunk: Any) -> None:
        key = (sender, stream_id, bool(flags & STREAM_FLAG_RESPONSE))
        reader = self.readers.get(key)
        if reader is None:
            return  # a stream we stopped reading, or that ended
        if flags & STREAM_FLAG_ERROR:
            try:
                exc: BaseException = error_from_wire(self.serializer.decode_value(chunk), sender)
            except ProtocolError as bad:
                exc = StreamError(f"the producer failed the stream with an unreadable error: {bad}")
            self._pop_reader(key)
            reader.deliver_error(exc)
            if not key[2]:
                scope = self.serving.get((sender, stream_id))
                if scope is not None and isinstance(exc, StreamError):
                    scope.cancel()
            return
        if flags & STREAM_FLAG_END:
            reader.deliver_end(seq)
            self._pop_reader(key)
            return
        reader.deliver(seq, chunk)

    def moleculer_stream_config(self) -> tuple[int, int]:
        """(window, chunk) of a stream sent as Moleculer's packets: chunks of at most
        Moleculer's 256 KiB (its ``maxChunkSize``) that fit one transport frame once encoded
        (JSON writes a byte as up to 4 characters of Node's Buffer form)."""
        chunk = min(_MOLECULER_MAX_CHUNK, self.node.max_chunk)
        room = self.transport.max_payload
        if room is not None:
            per_byte = 4 if self.serializer.name == "json" else 1
            chunk = max(1024, min(chunk, (room - _PACKET_ROOM) // per_byte))
        return 4 * chunk, chunk

    def _on_stream_packet(self, sender: str, pkt: Request | Response, stream_id: str, response: bool) -> None:
        """One of Moleculer's stream packets after the one that opened the stream (seq >= 1):
        a chunk (``stream: true``), or the end or the stream's error (``stream: false``)."""
        key = (sender, stream_id, response)
        reader = self.readers.get(key)
        if reader is None:
            return  # a stream that ended, failed or was stopped here: the rest is not read
        seq = pkt.seq
        if type(seq) is not int or not 1 <= seq <= _MAX_SEQ:
            self._fail_reader(key, reader, StreamError(f"{sender} sent a stream packet with seq {seq!r}"))
            return
        if pkt.stream:
            chunk = pkt.data if response else pkt.params  # type: ignore[union-attr]
            if not isinstance(chunk, (bytes, bytearray)):
                self._fail_reader(key, reader, StreamError(
                    f"{sender} sent a stream chunk of {type(chunk).__name__}, not bytes (an "
                    "object-mode stream: nerve's streams carry bytes)"))
                return
            reader.deliver(seq - 1, chunk)
            return
        if response:
            error = pkt.error if pkt.success is False else None  # type: ignore[union-attr]
        else:  # v5 puts it in headers, v4 in meta
            error = None
            for holder in (pkt.headers, pkt.meta):
                if isinstance(holder, dict) and holder.get("$streamError") is not None:
                    error = holder["$streamError"]
                    break
        if error is not None:
            self._fail_reader(key, reader, error_from_wire(error, sender))
            return
        reader.deliver_end(seq - 1)
        self._pop_reader(key)

    def _fail_reader(self, key: tuple[str, str, bool], reader: PacketStream, exc: BaseException) -> None:
        self._pop_reader(key)
        reader.deliver_error(exc)

    def on_stream_credit(self, sender: str, flags: int, stream_id: str, consumed: int) -> None:
        key = (sender, stream_id, bool(flags & STREAM_FLAG_RESPONSE))
        writer = self.writers.get(key)
        if writer is None:
            return
        if flags & STREAM_FLAG_END:
            self.writers.pop(key, None)
            writer.on_credit(consumed, stop=True)
        else:
            writer.on_credit(consumed)


def _stream_offer(nerve: Any) -> tuple[int, int, int] | None:
    """The (window, max chunk, max request streams) a nerve node's INFO offers for nerve's
    stream frames on a bus, or None (a moleculer.js node, or values out of range)."""
    if not isinstance(nerve, dict):
        return None
    streams = nerve.get("streams")
    if not isinstance(streams, dict):
        return None
    window, chunk, most = streams.get("window"), streams.get("maxChunk"), streams.get("maxStreams")
    if type(window) is not int or type(chunk) is not int or type(most) is not int:
        return None
    if not (1024 <= chunk <= window <= 1 << 31 and 1 <= most <= 1 << 16):
        return None
    return window, chunk, most


def _budget_ms(timeout: float | None) -> int:
    """The REQ ``timeout`` field: what remains of the caller's budget, in ms (0 = none,
    negative = spent)."""
    deadline = effective_deadline()
    if deadline == _INF:
        if timeout is None:
            return 0
        remaining = timeout
    else:
        remaining = deadline - trio.current_time()
        if timeout is not None and timeout < remaining:
            remaining = timeout
    if remaining <= 0:
        return -1
    # Rounded up: the callee's deadline is never before the caller's, so when both come from
    # the caller's cancel scope, the caller's own scope is the one that fires.
    return max(1, math.ceil(remaining * 1000))


async def yield_to_own_deadline(due: float = _INF) -> None:
    """The call ended in RequestTimeoutError, ours or the callee's (which ran under the budget
    we sent). If ``due`` (the call's own ``timeout=``) has passed, that timeout won: return.
    Otherwise, if the budget was our own cancel scope's, let that scope fire (the caller sees
    its cancellation, not a remote timeout)."""
    now = trio.current_time()
    if now >= due:
        return
    deadline = effective_deadline()
    if deadline - now < 0.005:
        await trio.sleep_until(deadline)


def _now_ms() -> int:
    return int(time.time() * 1000)


@lru_cache(maxsize=1)
def _version() -> str:
    try:
        from importlib.metadata import version

        return version("nerve")
    except Exception:  # pragma: no cover - not installed as a distribution
        return "0"


def _client_info() -> dict[str, Any]:
    """INFO's ``client``: what runs this node (Moleculer's type, version, langVersion)."""
    return {"type": "python", "version": _version(), "langVersion": platform.python_version(),
            "name": "nerve"}


@lru_cache(maxsize=1)
def local_ip_list() -> list[str]:
    try:
        return sorted({str(ai[4][0]) for ai in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)})
    except OSError:
        return []

