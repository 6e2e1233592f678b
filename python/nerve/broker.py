"""The Broker: lifecycle, services, call / emit / broadcast and local dispatch.

A broker owns a nursery for its transport and its handler tasks; nothing it starts outlives
``async with Broker(...)``. Local calls run the handler in the caller's task (no task hop);
remote calls go through the transit.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec
import trio

from nerve._dispatch import HandlerPool
from nerve.context import Context
from nerve.errors import (
    BrokerOptionsError,
    MaxCallLevelError,
    NerveError,
    RequestTimeoutError,
    ServiceNotFoundError,
    ServiceSchemaError,
    StreamError,
)
from nerve.packets import PROTOCOL_VERSION, UNSET, Disconnect, Event, Ping, Pong
from nerve.registry import Registry, Strategy
from nerve.serializers import Serializer, get_serializer
from nerve.service import ActionSpec, EventSpec, Service
from nerve.streams import DEFAULT_MAX_CHUNK, DEFAULT_STREAM_WINDOW, PacketStream
from nerve.transit import Transit, yield_to_own_deadline
from nerve.transports import Transport, make_transport

__all__ = ["Broker"]

log = logging.getLogger("nerve.broker")

_local_counter = itertools.count(1)
_INF = float("inf")


class Broker:
    """A node of a nerve cluster.

    ``transport=None`` connects brokers of this process in memory; ``"tcp://host:port"``
    listens there (port 0 picks a free port; read :attr:`address` once started) and
    ``peers=["tcp://host:port", ...]`` are seeds. Use as ``async with Broker(...) as b:``.

    Limits (safe defaults): ``max_pending_requests`` handlers and event handlers running at
    once (beyond it, remote calls get ``QueueIsFullError``, 429, retryable); per peer,
    ``max_peer_requests`` requests served at once (default: a fair share of
    ``max_pending_requests`` among the connected peers, so one peer cannot starve the others)
    and ``max_peer_streams`` request streams (64; told to peers, whose calls beyond it wait
    for a slot; so one peer holds at most ``max_peer_streams`` x ``stream_window`` bytes);
    ``stream_window`` / ``max_chunk`` per stream; ``max_frame_size`` on TCP;
    ``stream_idle_timeout`` between chunks; ``heartbeat_timeout`` for silent peers;
    ``max_write_queue`` (TCP, 64 MiB): bytes queued for a peer that does not read them before
    its connection is dropped.
    ``secret`` (TCP): nodes prove they share it (HMAC-SHA256 challenge-response in the
    handshake) before any frame of theirs is processed. Before that, a peer may hold one
    handshake frame of at most ``max_hello_size`` (64 KiB), with at most ``max_handshakes``
    (64) handshakes in progress, a quarter of them from one host. ``max_connections`` (1024)
    established connections at most. ``max_redials`` (10): failed dials in a row of an
    address learned from a peer before it is forgotten (seeds are dialled for ever).
    ``tls_cert`` / ``tls_key`` / ``tls_ca`` (TCP): connections run over TLS; a peer's chain
    is verified against ``tls_ca`` and its certificate must name its node id (the dialer also
    accepts the host it dialled). ``tls_mutual=True``: acceptors require a client
    certificate too, naming the dialer's node id.
    """

    def __init__(
        self,
        node_id: str | None = None,
        *,
        transport: str | Transport | None = None,
        peers: Iterable[str] = (),
        namespace: str = "",
        serializer: str | Serializer = "msgpack",
        protocol_version: str = PROTOCOL_VERSION,
        services: Iterable[Service] = (),
        request_timeout: float | None = None,
        retries: int = 0,
        retry_delay: float = 0.1,
        retry_max_delay: float = 1.0,
        retry_factor: float = 2.0,
        max_call_level: int = 100,
        strategy: Strategy | None = None,
        prefer_local: bool = True,
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 15.0,
        graceful_stop_timeout: float = 10.0,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        stream_idle_timeout: float | None = 60.0,
        max_frame_size: int | None = None,
        max_pending_requests: int = 10_000,
        max_peer_requests: int | None = None,
        max_peer_streams: int = 64,
        max_write_queue: int | None = None,
        max_hello_size: int | None = None,
        max_handshakes: int | None = None,
        max_redials: int | None = None,
        max_connections: int | None = None,
        secret: str | bytes | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_mutual: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if protocol_version not in ("4", "5"):
            raise BrokerOptionsError(f"protocol_version must be '4' or '5', not {protocol_version!r}")
        if max_chunk <= 0 or stream_window < max_chunk:
            raise BrokerOptionsError("need 0 < max_chunk <= stream_window")
        if retries < 0 or max_call_level < 1:
            raise BrokerOptionsError("retries must be >= 0 and max_call_level >= 1")
        if max_pending_requests < 1 or max_peer_streams < 1 or (
                max_peer_requests is not None and max_peer_requests < 1):
            raise BrokerOptionsError("max_pending_requests, max_peer_requests and max_peer_streams must be >= 1")
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}-{next(_local_counter)}"
        self.namespace = namespace
        self.protocol_version = protocol_version
        self.request_timeout = request_timeout or None
        self.retries = retries
        self.retry_delay = retry_delay
        self.retry_max_delay = retry_max_delay
        self.retry_factor = retry_factor
        self.max_call_level = max_call_level
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.graceful_stop_timeout = graceful_stop_timeout
        self.stream_window = stream_window
        self.max_chunk = max_chunk
        self.max_pending_requests = max_pending_requests
        self.max_peer_requests = max_peer_requests
        self.max_peer_streams = max_peer_streams
        self.stream_idle_timeout = stream_idle_timeout
        self.metadata = dict(metadata or {})
        self.serializer = get_serializer(serializer)
        self.registry = Registry(self.node_id, strategy=strategy, prefer_local=prefer_local)
        options: dict[str, Any] = {"peers": list(peers)}
        if max_frame_size is not None:
            options["max_frame_size"] = max_frame_size
        if secret is not None:
            options["secret"] = secret
        if max_write_queue is not None:
            options["max_write_queue"] = max_write_queue
        tcp_only = {"max_hello_size": max_hello_size, "max_handshakes": max_handshakes,
                    "max_redials": max_redials, "max_connections": max_connections, "tls_cert": tls_cert, "tls_key": tls_key,
                    "tls_ca": tls_ca, "tls_mutual": tls_mutual or None}
        options.update({k: v for k, v in tcp_only.items() if v is not None})
        if transport is None and (options["peers"] or secret is not None or tls_cert or tls_ca):
            raise BrokerOptionsError("peers=, secret= and tls_* need a tcp:// transport")
        self.transport = make_transport(transport, **options)
        if not self.transport.max_streams:
            self.transport.max_streams = max_peer_streams  # told to peers (TCP's HELLO)
        else:  # a transport given with its own: that is what peers are told, and what holds
            self.max_peer_streams = self.transport.max_streams
        self.transit = Transit(self, self.transport, self.serializer, protocol_version=protocol_version)
        self.services: dict[str, Service] = {}
        self._specs: dict[str, tuple[list[ActionSpec], list[EventSpec]]] = {}
        self._local_actions: dict[str, ActionSpec] = {}
        self._id_prefix = secrets.token_hex(6)
        self._ids = itertools.count(1)
        self._stopping = False
        self._running = False
        self._services_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: Any = None
        self._handlers = HandlerPool()
        self._pongs: dict[str, trio.Event] = {}
        self.stats = {"event_handler_errors": 0, "events_received": 0, "calls": 0}
        for svc in services:
            self._register(svc)
        from nerve.node_service import NodeService

        self._register(NodeService())

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def address(self) -> str | None:
        """The transport's bound address (``tcp://host:port``), once started."""
        return self.transport.address

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the broker (prefer ``async with``). ``start`` opens the broker's nursery in the
        calling task, so ``stop`` must be called by the same task, at the same nesting."""
        if self._running:
            raise BrokerOptionsError("broker already started")
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        self._handlers.bind(self._nursery)
        self._nursery.start_soon(self.transit.timers.run, name="nerve call timeouts")
        self._running = True
        try:
            for svc in list(self.services.values()):
                await svc.started()
            await self._nursery.start(self.transport.serve, self.transit)
        except BaseException:
            await self._teardown()
            raise
        log.info("broker %s started (%s)", self.node_id, self.transport.address or "local")

    async def stop(self) -> None:
        """Stop gracefully: stop taking calls, drain handlers (up to ``graceful_stop_timeout``),
        say DISCONNECT, close the transport."""
        if not self._running or self._stopping:
            return
        self._stopping = True
        with trio.CancelScope(shield=True):
            self.transit.announce()
            with trio.move_on_after(self.graceful_stop_timeout) as drain:
                await self._handlers.wait_idle()
            if drain.cancelled_caught:
                log.warning("broker %s: %d handlers still running after %ss; cancelling them",
                            self.node_id, self._handlers.active, self.graceful_stop_timeout)
            for svc in list(self.services.values()):
                try:
                    await svc.stopped()
                except Exception:
                    log.exception("service %s failed to stop", svc.full_name)
            try:
                self.transit.broadcast_packet(Disconnect(ver=self.protocol_version, sender=self.node_id))
            except NerveError:
                pass
            with trio.move_on_after(2):
                await self.transport.disconnect_all()
        await self._teardown()

    async def _teardown(self) -> None:
        nursery, cm = self._nursery, self._nursery_cm
        self._nursery = self._nursery_cm = None
        self._handlers.bind(None)
        self._running = False
        if nursery is not None:
            nursery.cancel_scope.cancel()
            await cm.__aexit__(None, None, None)
        # Calls still waiting (in tasks outside the broker) would wait forever: no RES and no
        # timer is coming any more.
        self.transit.fail_all_pending(f"node '{self.node_id}' stopped")

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in the broker's nursery (for example a stream's producer).

        Exceptions are logged, not raised; the task is cancelled when the broker stops.
        """
        self._handlers.start_soon(fn, *args)

    # --- services -----------------------------------------------------------------------

    def _register(self, svc: Service) -> None:
        if not isinstance(svc, Service):
            raise ServiceSchemaError(f"{svc!r} is not a nerve.Service")
        actions, events = svc._specs()
        name = svc.full_name
        if name in self.services:
            raise ServiceSchemaError(f"service {name!r} is already registered on this broker")
        svc.broker = self
        self.services[name] = svc
        self._specs[name] = (actions, events)
        for a in actions:
            self._local_actions[a.name] = a
        self.registry.add_local(name, actions, events)

    def add_service(self, svc: Service) -> None:
        """Add a service; on a running broker its ``started()`` runs and peers learn of it."""
        self._register(svc)
        if self._running:
            self._handlers.start_soon(self._start_added, svc)

    async def _start_added(self, svc: Service) -> None:
        await svc.started()
        self.transit.announce()

    async def remove_service(self, name: str) -> None:
        """Remove a service by (full) name; peers stop routing to it."""
        svc = self.services.pop(name, None)
        if svc is None:
            raise ServiceNotFoundError(f"no local service {name!r}", data={"service": name})
        actions, _ = self._specs.pop(name)
        for a in actions:
            self._local_actions.pop(a.name, None)
        self.registry.remove_local(name)
        if self._running:
            self.transit.announce()
        await svc.stopped()

    def _local_action(self, name: str) -> ActionSpec | None:
        return self._local_actions.get(name)

    def _describe_services(self) -> list[dict[str, Any]]:
        if self._stopping:
            return []
        return [svc.describe(*self._specs[name]) for name, svc in self.services.items()]

    async def wait_for_services(self, *names: str, timeout: float | None = 10.0) -> None:
        """Wait until every service in ``names`` is available somewhere in the cluster."""

        def missing() -> list[str]:
            known = {ep.service for eps in self.registry.actions.values() for ep in eps}
            known.update(ev.service for ev in self.registry.events)
            return [n for n in names if n not in known]

        with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
            while missing():
                self._services_changed = trio.Event()
                await self._services_changed.wait()
        if scope.cancelled_caught:
            raise RequestTimeoutError(f"services not available after {timeout}s: {missing()}",
                                      data={"services": missing()})

    # --- calls --------------------------------------------------------------------------

    def _next_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    def create_stream(self, **kw: Any) -> PacketStream:
        """A new PacketStream with this broker's window, chunk size and idle timeout."""
        kw.setdefault("window", self.stream_window)
        kw.setdefault("max_chunk", self.max_chunk)
        kw.setdefault("idle_timeout", self.stream_idle_timeout)
        return PacketStream(**kw)

    async def call(
        self,
        action: str,
        params: Any = None,
        *,
        meta: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        node_id: str | None = None,
        stream: PacketStream | None = None,
        idle_timeout: float | None = None,
        parent_ctx: Context | None = None,
    ) -> Any:
        """Call ``action`` and return its result (a PacketStream if it answers with one).

        ``meta`` is sent with the call, and the callee's final meta is merged into this same
        dict when the call settles (result or error). ``timeout`` (seconds) and the caller's
        cancel scope both bound the call; the earlier deadline wins and the remaining budget
        travels to the callee. ``retries`` retries retryable errors with exponential backoff,
        preferring another node. ``node_id`` calls that node only. ``stream`` is the request
        body. ``idle_timeout`` bounds the gap between chunks of this call's streams (the
        request stream's own setting and the broker's ``stream_idle_timeout`` otherwise); the
        call timeout never bounds a transfer, only the wait for the response. ``parent_ctx`` makes this a nested call of that context (as ``ctx.call`` does):
        meta starts from a copy of the parent's and merges back into it.

        Cancelling a call may leave the callee running (there is no cancel packet), except that
        a call with a request stream aborts that stream, which cancels the handler.
        """
        if not self._running:
            raise BrokerOptionsError("the broker is not running (use 'async with Broker(...)')")
        parent = parent_ctx
        if parent is not None:
            level = parent.level + 1
            if level > self.max_call_level:
                raise MaxCallLevelError(f"Request level is reached, the limit is '{self.max_call_level}'.",
                                        data={"level": level, "action": action}, node_id=self.node_id)
            base_meta = dict(parent.meta)
            if meta:
                base_meta.update(meta)
            merge_into: dict[str, Any] | None = parent.meta
        else:
            level = 1
            base_meta = dict(meta) if meta else {}
            merge_into = meta
        if timeout is None:
            timeout = self.request_timeout
        elif not 0 < timeout < _INF:  # 0, negative, inf or nan: no timeout
            timeout = None
        if retries is None:
            retries = self.retries
        if params is None:
            params = {}  # as Moleculer: a call without params has empty params
        if idle_timeout is not None:
            if stream is not None:
                stream.idle_timeout = idle_timeout
            result = await self.call(action, params, meta=meta, headers=headers, timeout=timeout,
                                     retries=retries, node_id=node_id, stream=stream, parent_ctx=parent_ctx)
            if isinstance(result, PacketStream):
                result.idle_timeout = idle_timeout
            return result
        self.stats["calls"] += 1
        attempt = 0
        tried: set[str] = set()
        if parent is None:
            request_id: str | None = None
            parent_id = caller = None
        else:
            request_id, parent_id, caller = parent.request_id, parent.id, parent.service
        try:
            while True:
                call_id = self._next_id()
                call_meta = dict(base_meta) if retries else base_meta
                call_headers = dict(headers) if headers else {}
                endpoint_node = None
                try:
                    ep = self.registry.select_action(action, node_id=node_id, exclude=tried)
                    endpoint_node = ep.node_id
                    if stream is None and not ep.local:
                        # The common remote call, flattened: no Context, no extra coroutine frames,
                        # and a timeout is a dict entry in the transit's DeadlineQueue, not a scope.
                        transit = self.transit
                        pending = transit.send_request(ep, call_id, params, call_meta, call_headers, level,
                                                       request_id or call_id, parent_id, caller, timeout=timeout)
                        if timeout is None:
                            due, expiry = _INF, None
                        else:
                            due = trio.current_time() + timeout
                            expiry = transit.expire_at(pending, due, action)
                        try:
                            if pending.settled:
                                await trio.lowlevel.checkpoint()
                            else:
                                pending._task = trio.lowlevel.current_task()
                                await trio.lowlevel.wait_task_rescheduled(pending.abort)
                        finally:
                            del transit.pending[call_id]
                            if expiry is not None:
                                transit.timers.discard(expiry, pending)
                        if isinstance(pending.error, RequestTimeoutError):
                            await yield_to_own_deadline(due)
                    else:
                        ctx = Context(self, id=call_id, request_id=request_id, parent_id=parent_id, level=level,
                                      caller=caller, params=params, meta=call_meta, headers=call_headers,
                                      action=action, node_id=self.node_id)
                        if ep.local:
                            spec = ep.spec
                            assert spec is not None
                            try:
                                if stream is None and timeout is None:
                                    if spec.wants_params:
                                        result = await spec.handler(ctx, spec.convert_params(params))
                                    else:
                                        result = await spec.handler(ctx)
                                    if isinstance(result, msgspec.Struct):
                                        return msgspec.to_builtins(result)
                                    if isinstance(result, PacketStream):
                                        return self._local_response_stream(result)
                                    return result
                                return await self._call_local(spec, ctx, timeout, stream)
                            finally:
                                if merge_into is not None:
                                    merge_into.update(ctx.meta)
                        assert stream is not None
                        pending = await self.transit.request(ep, ctx, timeout=timeout, stream=stream)
                    if pending.meta and merge_into is not None:
                        merge_into.update(pending.meta)
                    if pending.error is not None:
                        raise pending.error
                    return pending.result
                except NerveError as exc:
                    if (not exc.retryable or attempt >= retries
                            or (stream is not None and stream._bound.is_set())):
                        if stream is not None and not stream._bound.is_set():
                            # The call failed before it took its request stream: a task feeding
                            # that stream would otherwise wait for ever.
                            stream._abort_now(exc)
                        raise
                    delay = min(self.retry_delay * self.retry_factor ** attempt, self.retry_max_delay)
                    log.debug("retrying %s after %r (attempt %d, in %.3fs)", action, exc, attempt + 1, delay)
                    attempt += 1
                    if endpoint_node is not None:
                        tried.add(endpoint_node)
                    await trio.sleep(delay)
        except BaseException:
            if stream is not None and not stream._bound.is_set() and not stream._tx_done:
                # Cancelled (or failed) before the call took its request stream: a task
                # feeding that stream learns now rather than waiting for ever.
                stream._abort_now(StreamError("the call ended before it took its request stream"))
            raise

    def _local_response_stream(self, result: PacketStream) -> PacketStream:
        reader = result._pipe()
        if result._source is not None:
            self._handlers.start_soon(result._pump)
        return reader

    async def _call_local(self, spec: ActionSpec, ctx: Context, timeout: float | None,
                          stream: PacketStream | None) -> Any:
        if stream is None:
            if timeout is None:
                result = await self._invoke(spec, ctx)
            else:
                with trio.move_on_after(timeout) as scope:
                    result = await self._invoke(spec, ctx)
                if scope.cancelled_caught:
                    raise RequestTimeoutError(
                        f"Request is timed out when call '{spec.name}' action on '{self.node_id}' node.",
                        data={"action": spec.name, "nodeID": self.node_id}, node_id=self.node_id)
        else:
            reader = stream._pipe()
            ctx.stream = reader
            if stream._source is not None:
                self._handlers.start_soon(stream._pump)
            result = None
            try:
                with trio.CancelScope() as scope:
                    if timeout is not None:
                        stream._on_closed.append(
                            lambda: setattr(scope, "deadline", trio.current_time() + timeout))
                    result = await self._invoke(spec, ctx)
            finally:
                if isinstance(result, PacketStream):
                    result._on_closed.append(lambda: _finish_reader(reader))
                else:
                    _finish_reader(reader)
                    if not stream._tx_done:
                        stream._abort_now(StreamError("the call ended before its request stream did"))
            if scope.cancelled_caught:
                raise RequestTimeoutError(
                    f"Request is timed out when call '{spec.name}' action on '{self.node_id}' node.",
                    data={"action": spec.name, "nodeID": self.node_id}, node_id=self.node_id)
        if isinstance(result, PacketStream):
            return self._local_response_stream(result)
        if isinstance(result, msgspec.Struct):
            return msgspec.to_builtins(result)
        return result

    async def _invoke(self, spec: ActionSpec, ctx: Context) -> Any:
        if spec.wants_params:
            return await spec.handler(ctx, spec.convert_params(ctx.params))
        return await spec.handler(ctx)

    # --- events -------------------------------------------------------------------------

    async def emit(self, event: str, data: Any = None, *, groups: str | list[str] | None = None,
                   meta: dict[str, Any] | None = None) -> None:
        """Deliver ``event`` to one handler per group (balanced; ``groups`` limits them)."""
        await self._emit(event, data, groups=groups, meta=meta, parent=None, broadcast=False)

    async def broadcast(self, event: str, data: Any = None, *, groups: str | list[str] | None = None,
                        meta: dict[str, Any] | None = None) -> None:
        """Deliver ``event`` to every handler on every node."""
        await self._emit(event, data, groups=groups, meta=meta, parent=None, broadcast=True)

    async def broadcast_local(self, event: str, data: Any = None, *, groups: str | list[str] | None = None,
                              meta: dict[str, Any] | None = None) -> None:
        """Deliver ``event`` to every handler of this broker only."""
        group_list = [groups] if isinstance(groups, str) else groups
        for ep in self.registry.event_endpoints(event):
            if ep.local and (group_list is None or ep.group in group_list):
                self._spawn_event(ep.spec, event, data, meta or {}, None, self.node_id, group_list)
        await trio.lowlevel.checkpoint()

    async def _emit(self, event: str, data: Any, *, groups: str | list[str] | None,
                    meta: dict[str, Any] | None, parent: Context | None, broadcast: bool) -> None:
        if not self._running:
            raise BrokerOptionsError("the broker is not running (use 'async with Broker(...)')")
        group_list = [groups] if isinstance(groups, str) else (list(groups) if groups else None)
        if broadcast:
            endpoints = [ep for ep in self.registry.event_endpoints(event)
                         if group_list is None or ep.group in group_list]
        else:
            endpoints = self.registry.pick_per_group(event, group_list, parent)
        if parent is not None:
            event_meta = dict(parent.meta)
            if meta:
                event_meta.update(meta)
        else:
            event_meta = dict(meta) if meta else {}
        remote: dict[str, list[str]] = {}
        for ep in endpoints:
            if ep.local:
                self._spawn_event(ep.spec, event, data, dict(event_meta), parent, self.node_id, group_list)
            else:
                remote.setdefault(ep.node_id, []).append(ep.group)
        level = parent.level + 1 if parent is not None else 1
        for node, node_groups in remote.items():
            pkt = Event(
                ver=self.protocol_version, sender=self.node_id, id=self._next_id(), event=event,
                data=data, groups=(group_list if broadcast else sorted(set(node_groups))),
                broadcast=broadcast, meta=event_meta, headers={} if self.protocol_version != "4" else UNSET,
                level=level, tracing=None, parent_id=parent.id if parent else None,
                request_id=parent.request_id if parent else None,
                caller=parent.service if parent else None, need_ack=False,
            )
            try:
                self.transit.send_packet(node, pkt)
            except NerveError as exc:
                log.warning("event %s to %s not sent: %r", event, node, exc)
                continue
        if remote:
            # Backpressure (and the checkpoint): wait while a connection's queue is over its mark.
            for node in remote:
                await self.transport.wait_writable(node)
        else:
            await trio.lowlevel.checkpoint()

    def _on_remote_event(self, sender: str, pkt: Event) -> None:
        self.stats["events_received"] += 1
        groups = pkt.groups if isinstance(pkt.groups, list) else None
        if pkt.broadcast:
            endpoints = [ep for ep in self.registry.event_endpoints(pkt.event)
                         if ep.local and (groups is None or ep.group in groups)]
        else:
            endpoints = self.registry.pick_per_group(pkt.event, groups, None, local_only=True)
        for ep in endpoints:
            parent = None
            self._spawn_event(ep.spec, pkt.event, pkt.data, pkt.meta or {}, parent, sender, groups,
                              level=pkt.level if isinstance(pkt.level, int) else 1,
                              request_id=pkt.request_id or None, parent_id=pkt.parent_id or None,
                              caller=pkt.caller or None)

    def _spawn_event(self, spec: EventSpec | None, event: str, data: Any, meta: dict[str, Any],
                     parent: Context | None, node_id: str, groups: list[str] | None, *,
                     level: int | None = None, request_id: str | None = None,
                     parent_id: str | None = None, caller: str | None = None) -> None:
        if spec is None:
            return
        ctx = Context(
            self, id=self._next_id(), params=data, meta=meta, event=event, event_groups=groups,
            node_id=node_id, service=spec.service.full_name,
            level=level if level is not None else (parent.level + 1 if parent else 1),
            request_id=request_id or (parent.request_id if parent else None),
            parent_id=parent_id or (parent.id if parent else None),
            caller=caller or (parent.service if parent else None),
        )
        self._handlers.start_soon(self._run_event, spec, ctx)

    async def _run_event(self, spec: EventSpec, ctx: Context) -> None:
        try:
            if spec.wants_data:
                data = ctx.params
                if spec.data_type is not None:
                    data = msgspec.convert(data, spec.data_type)
                await spec.handler(ctx, data)
            else:
                await spec.handler(ctx)
        except Exception:
            self.stats["event_handler_errors"] += 1
            log.exception("event handler %s.%s for %r failed", spec.service.full_name,
                          getattr(spec.handler, "__name__", "?"), ctx.event)

    def _node_event(self, name: str, node_id: str, *, unexpected: bool) -> None:
        if not self._running:
            return
        data = {"node": {"id": node_id}, "unexpected": unexpected}
        for ep in self.registry.event_endpoints(name):
            if ep.local:
                self._spawn_event(ep.spec, name, data, {}, None, self.node_id, None)
        self._services_changed.set()

    async def ping(self, node_id: str, timeout: float = 2.0) -> float:
        """Round-trip time to ``node_id`` in seconds (PING/PONG packets)."""
        ping_id = self._next_id()
        waiter = self._pongs[ping_id] = trio.Event()
        start = trio.current_time()
        try:
            self.transit.send_packet(node_id, Ping(ver=self.protocol_version, sender=self.node_id,
                                                   time=int(time.time() * 1000), id=ping_id))
            with trio.move_on_after(timeout):
                await waiter.wait()
                return trio.current_time() - start
        finally:
            del self._pongs[ping_id]
        raise RequestTimeoutError(f"no PONG from '{node_id}' within {timeout}s", data={"nodeID": node_id})

    def _on_pong(self, sender: str, pkt: Pong) -> None:
        waiter = self._pongs.get(str(pkt.id))
        if waiter is not None:
            waiter.set()


def _finish_reader(reader: PacketStream) -> None:
    if not reader._rx.finished:
        reader._stop_reading(StreamError("the handler returned before reading the whole stream"))
