"""The Broker: lifecycle, services, call / emit / broadcast and local dispatch.

A broker owns a nursery for its transport and its handler tasks; nothing it starts outlives
``async with Broker(...)``. Local calls run the handler in the caller's task (no task hop);
remote calls go through the transit.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import trio

from nerve._calls import Caller
from nerve._dispatch import HandlerPool
from nerve._malloc import tune_for_streams
from nerve._serving import Server
from nerve.context import Context
from nerve.logs import node_logger
from nerve.errors import (
    BrokerNotRunningError,
    BrokerOptionsError,
    NerveError,
    RequestTimeoutError,
    ServiceNotFoundError,
    ServiceSchemaError,
)
from nerve.middleware import Chain, EventOptions, Middleware
from nerve.packets import PROTOCOL_VERSION, Disconnect
from nerve.registry import Registry, Strategy
from nerve.serializers import Serializer, get_serializer
from nerve.service import ActionSpec, EventSpec, Service, specs_of
from nerve.statistics import BrokerStatistics
from nerve.streams import DEFAULT_MAX_CHUNK, DEFAULT_STREAM_WINDOW, PacketStream
from nerve.transit import Transit
from nerve.transports import Transport, make_transport

__all__ = ["Broker"]


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
    ``max_stream_buffer`` (16 MiB): bytes a stream may hold unread when its producer takes
    no credit (a moleculer.js node: Moleculer's streams have no flow control); beyond it the
    stream fails with ``StreamOverflowError`` rather than grow.
    ``disable_balancer=True`` (NATS): Moleculer's ``disableBalancer``: calls and emits go
    to the bus's queue groups (``REQB.<action>``, ``EVENTB.<group>.<event>``), which pick
    the node, instead of this node choosing one; calls served here, calls with ``node_id=``,
    calls with a stream and broadcasts do not (see docs/guide.md, "Transports").
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
    ``advertise="tcp://host:port"`` (TCP): the address peers are told to dial (behind NAT, in
    a container); by default the bound address, a wildcard host (``0.0.0.0``) replaced by this
    host's first non-loopback address. A seed that cannot be reached is logged at once (a
    warning naming it and why), and ``wait_for_services`` names it when it times out.
    ``metrics=True`` / ``metrics_port=``: see :mod:`nerve.metrics`.
    ``forget_offline_after`` (600 s, as Moleculer): how long a node that left (gracefully or
    by heartbeat timeout) stays in ``$node.list`` as offline; None keeps the last 256.
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
        max_stream_buffer: int = 16 * 1024 * 1024,
        disable_balancer: bool = False,
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
        middlewares: Iterable[Middleware] = (),
        dependency_timeout: float | None = None,
        metrics: bool | Any = False,
        metrics_port: int | str | None = None,
        advertise: str | None = None,
        forget_offline_after: float | None = 600.0,
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
        #: this node's logger: its records carry ``node_id`` (see ``nerve.logs``)
        self.logger = node_logger("nerve.broker", self.node_id)
        self._started_at: float | None = None
        self._events_emitted = 0
        self._events_broadcast = 0
        #: ``nerve.metrics.Metrics`` when metrics are on (``metrics=True`` or ``metrics_port=``)
        self.metrics: Any = None
        if metrics or metrics_port is not None:
            from nerve.metrics import Metrics

            self.metrics = metrics if isinstance(metrics, Metrics) else Metrics()
            self.metrics.bind(self, metrics_port)
        self._meter = self.metrics.meter if self.metrics is not None else None
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
        if max_stream_buffer < 1024:
            raise BrokerOptionsError("max_stream_buffer must be at least 1024 bytes")
        self.max_stream_buffer = max_stream_buffer
        self.disable_balancer = disable_balancer
        self.metadata = dict(metadata or {})
        self.serializer = get_serializer(serializer)
        self.registry = Registry(self.node_id, strategy=strategy, prefer_local=prefer_local)
        self.registry.forget_offline_after = forget_offline_after
        options: dict[str, Any] = {"peers": list(peers)}
        if max_frame_size is not None:
            options["max_frame_size"] = max_frame_size
        if secret is not None:
            options["secret"] = secret
        if max_write_queue is not None:
            options["max_write_queue"] = max_write_queue
        tcp_only = {"max_hello_size": max_hello_size, "max_handshakes": max_handshakes,
                    "max_redials": max_redials, "max_connections": max_connections, "tls_cert": tls_cert, "tls_key": tls_key,
                    "tls_ca": tls_ca, "tls_mutual": tls_mutual or None, "advertise": advertise}
        options.update({k: v for k, v in tcp_only.items() if v is not None})
        if transport is None and (options["peers"] or secret is not None or tls_cert or tls_ca):
            raise BrokerOptionsError("peers=, secret= and tls_* need a tcp:// transport")
        if advertise is not None and not (isinstance(transport, str) and transport.startswith("tcp://")):
            raise BrokerOptionsError("advertise= needs a tcp:// transport (it is the address peers dial)")
        self.transport = make_transport(transport, **options)
        if disable_balancer:
            self.transport.set_balanced([], [])  # BrokerOptionsError unless the transport balances
        if not self.transport.max_streams:
            self.transport.max_streams = max_peer_streams  # told to peers (TCP's HELLO)
        else:  # a transport given with its own: that is what peers are told, and what holds
            self.max_peer_streams = self.transport.max_streams
        self.dependency_timeout = dependency_timeout
        self.middlewares = Chain(list(middlewares))
        self.middlewares.meter = self._meter
        self._strategy_reads_calls = bool(getattr(self.registry.strategy, "needs_context", False))
        self._handlers = HandlerPool()
        self._server = Server(self.node_id, self.middlewares, self._handlers, self.registry, self._meter)
        self.services: dict[str, Service] = {}
        self._specs: dict[str, tuple[list[ActionSpec], list[EventSpec]]] = {}
        self._local_actions: dict[str, ActionSpec] = {}
        self.transit = Transit(_Port(self), self.transport, self.serializer, protocol_version=protocol_version)
        self._id_prefix = secrets.token_hex(6)
        self._ids = itertools.count(1)
        self._stopping = False
        self._running = False
        self._services_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: Any = None
        self._server.bind_ids(self._next_id)
        self._caller = Caller(self, self.registry, self.transit, self._handlers, self.middlewares,
                              self._next_id, lambda: self._running, self._server.action_failed)
        self._emit_chain = self.middlewares.wrap_emit(self._emit_core)
        self._broadcast_chain = self.middlewares.wrap_broadcast(self._broadcast_core)
        #: services not started yet, hidden from peers (they wait for their dependencies)
        self._unstarted: set[str] = set()
        #: the dependency waits of services not started yet
        self._waits: dict[str, trio.CancelScope] = {}
        for svc in services:
            self._register(svc)
        from nerve.node_service import NodeService

        self._register(NodeService())
        self.middlewares.created(self)

    def statistics(self) -> BrokerStatistics:
        """A frozen snapshot of this node: its counters and its parts' (handler pool, transit,
        transport, registry); see :mod:`nerve.statistics`."""
        caller, server, transit = self._caller, self._server, self.transit
        started = self._started_at
        return BrokerStatistics(
            node_id=self.node_id, running=self._running,
            uptime=time.monotonic() - started if started is not None and self._running else 0.0,
            services=len(self.services), calls=caller.calls, calls_failed=caller.calls_failed,
            requests_served=caller.served + transit.requests_served,
            requests_failed=caller.served_failed + transit.requests_failed,
            events_emitted=self._events_emitted, events_broadcast=self._events_broadcast,
            events_handled=server.events_handled, event_handler_errors=server.event_handler_errors,
            handler_pool=self._handlers.statistics(), transit=transit.statistics(),
            transport=self.transport.statistics(), registry=self.registry.statistics())

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
        tune_for_streams()  # once per process: see nerve._malloc
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        self._handlers.bind(self._nursery)
        self._nursery.start_soon(self.transit.timers.run, name="nerve call timeouts")
        self._running = True
        try:
            strategy_run = getattr(self.registry.strategy, "run", None)
            if callable(strategy_run):
                self._nursery.start_soon(strategy_run, self, name="nerve strategy")
            await self.middlewares.started(self)
            waiting = [svc for svc in self.services.values() if svc.full_name in self._unstarted]
            for svc in list(self.services.values()):
                if svc.full_name not in self._unstarted:
                    await self._start_service(svc)
            await self._nursery.start(self.transport.serve, self.transit)
            if self.metrics is not None:
                await self.metrics.start(self._nursery)
            if waiting:
                failures: list[BaseException] = []

                async def start_one(svc: Service, scope: trio.CancelScope) -> None:
                    try:
                        await self._start_dependent(svc)
                    except Exception as exc:  # the first failure is the start's error, not a group
                        if not failures:
                            failures.append(exc)
                        scope.cancel()

                async with trio.open_nursery() as starting:
                    for svc in waiting:
                        starting.start_soon(start_one, svc, starting.cancel_scope)
                if failures:
                    raise failures[0]
        except BaseException:
            await self._teardown()
            raise
        self._started_at = time.monotonic()
        self.logger.info("node %s started: %s, %d services (%s)", self.node_id,
                         self.transport.address or type(self.transport).__name__,
                         len(self.services), ", ".join(sorted(self.services)))

    async def stop(self) -> None:
        """Stop gracefully: stop taking calls, drain handlers (up to ``graceful_stop_timeout``),
        say DISCONNECT, close the transport."""
        if not self._running or self._stopping:
            return
        self._stopping = True
        self.transit.stopping = True
        self.logger.info("node %s stopping", self.node_id)
        for wait in list(self._waits.values()):
            wait.cancel()  # services still waiting for their dependencies never start
        with trio.CancelScope(shield=True):
            self.transit.announce()
            with trio.move_on_after(self.graceful_stop_timeout) as drain:
                await self._handlers.wait_idle()
            if drain.cancelled_caught:
                self.logger.warning("broker %s: %d handlers still running after %ss; cancelling them",
                            self.node_id, self._handlers.active, self.graceful_stop_timeout)
            for svc in list(self.services.values()):
                if svc.full_name in self._unstarted:
                    continue  # never started
                try:
                    await svc.stopped()
                except Exception:
                    self.logger.exception("service %s failed to stop", svc.full_name)
                await self.middlewares.service_stopped(svc)
            await self.middlewares.stopped(self)
            try:
                self.transit.broadcast_packet(Disconnect(ver=self.protocol_version, sender=self.node_id))
            except NerveError:
                pass
            with trio.move_on_after(2):
                await self.transport.disconnect_all()
        await self._teardown()
        self.logger.info("node %s stopped", self.node_id)

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

    async def _start_service(self, svc: Service) -> None:
        await svc.started()
        await self.middlewares.service_started(svc)

    async def _start_dependent(self, svc: Service) -> None:
        """A service with ``dependencies``: its ``started()`` runs once they are all available
        (local or remote; ``dependency_timeout``: RequestTimeoutError after that); until then
        it is not published: not in the registry (local calls and ``wait_for_services`` do not
        see it) nor in INFO (peers do not)."""
        name = svc.full_name
        with trio.CancelScope() as scope:  # cancelled by remove_service / stop
            self._waits[name] = scope
            try:
                await self.wait_for_services(*svc.dependencies, timeout=self.dependency_timeout)
            finally:
                if self._waits.get(name) is scope:
                    del self._waits[name]
        if scope.cancelled_caught or self.services.get(name) is not svc:
            return  # removed (or the broker stops) while it waited
        await self._start_service(svc)
        if self.services.get(name) is not svc:  # removed while its started() ran
            await svc.stopped()
            await self.middlewares.service_stopped(svc)
            return
        self._unstarted.discard(name)
        self._publish(svc)
        self.transit.announce()

    async def _start_added_dependent(self, svc: Service) -> None:
        try:
            await self._start_dependent(svc)
        except Exception:
            self.logger.exception("service %s was added but did not start", svc.full_name)

    def _publish(self, svc: Service) -> None:
        """The service's actions and events become callable (locally and, with the next
        INFO, by peers)."""
        name = svc.full_name
        actions, events = self._specs[name]
        for a in actions:
            self._local_actions[a.name] = a
        self.registry.add_local(name, actions, events)
        self._services_updated()

    def _services_updated(self) -> None:
        """Wake every ``wait_for_services`` (each looks again; the next wait gets a new event)."""
        event, self._services_changed = self._services_changed, trio.Event()
        event.set()

    def _register(self, svc: Service) -> None:
        if not isinstance(svc, Service):
            raise ServiceSchemaError(f"{svc!r} is not a nerve.Service")
        actions, events = specs_of(svc)
        name = svc.full_name
        if name in self.services:
            raise ServiceSchemaError(f"service {name!r} is already registered on this broker")
        for a in actions:
            self._server.prepare_action(a)
        for e in events:
            self._server.prepare_event(e)
        svc.broker = self
        self.services[name] = svc
        self._specs[name] = (actions, events)
        if svc.dependencies or self._running:
            # Published once started (see _start_dependent, _start_added): a caller or a
            # dependent never reaches a service whose started() has not run.
            self._unstarted.add(name)
        else:
            self._publish(svc)  # started by start(), before the transport and the dependents

    def add_service(self, svc: Service) -> None:
        """Add a service; on a running broker its ``started()`` runs and peers learn of it
        (for a service with ``dependencies``, once they are available)."""
        self._register(svc)
        if self._running:
            assert self._nursery is not None
            if svc.dependencies:  # in the broker's nursery: its wait must not hold up a graceful stop
                self._nursery.start_soon(self._start_added_dependent, svc)
            else:
                self._handlers.start_soon(self._start_added, svc)

    async def _start_added(self, svc: Service) -> None:
        await self._start_service(svc)
        if self.services.get(svc.full_name) is svc:
            self._unstarted.discard(svc.full_name)
            self._publish(svc)
            self.transit.announce()
        else:  # removed while its started() ran: it is stopped now that it has started
            await svc.stopped()
            await self.middlewares.service_stopped(svc)

    async def remove_service(self, name: str) -> None:
        """Remove a service by (full) name; peers stop routing to it."""
        svc = self.services.pop(name, None)
        if svc is None:
            raise ServiceNotFoundError(f"no local service {name!r}", data={"service": name})
        actions, _ = self._specs.pop(name)
        for a in actions:
            self._local_actions.pop(a.name, None)
        self.registry.remove_local(name)
        self._services_updated()
        if name in self._unstarted:  # never started: its wait ends, and there is nothing to stop
            self._unstarted.discard(name)
            wait = self._waits.pop(name, None)
            if wait is not None:
                wait.cancel()
            await trio.lowlevel.checkpoint()
            return
        if self._running:
            self.transit.announce()
        await svc.stopped()
        await self.middlewares.service_stopped(svc)

    def _local_action(self, name: str) -> ActionSpec | None:
        return self._local_actions.get(name)

    def describe_services(self) -> list[dict[str, Any]]:
        """This node's services as INFO describes them (what peers see: actions with their
        properties, events)."""
        if self._stopping:
            return []
        return [svc.describe(*self._specs[name]) for name, svc in self.services.items()
                if name not in self._unstarted]

    async def wait_for_services(self, *names: str, timeout: float | None = 10.0) -> None:
        """Wait until every service in ``names`` is available somewhere in the cluster."""

        def missing() -> list[str]:
            known = {ep.service for eps in self.registry.actions.values() for ep in eps}
            known.update(ev.service for ev in self.registry.events)
            return [n for n in names if n not in known]

        with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
            while missing():
                await self._services_changed.wait()
        if scope.cancelled_caught:
            unreachable = self.transport.unreachable_seeds()
            why = "".join(f"; seed {address} not reachable: {reason}" for address, reason in unreachable.items())
            raise RequestTimeoutError(f"services not available after {timeout}s: {missing()}{why}",
                                      data={"services": missing(), "unreachableSeeds": unreachable})

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
        fallback: Any = None,
    ) -> Any:
        """Call ``action`` and return its result (a PacketStream if it answers with one).

        ``meta`` is sent with the call, and the callee's final meta is merged into this same
        dict when the call settles (result or error). ``timeout`` (seconds) bounds each attempt
        (as in Moleculer: a retried call may take up to ``(retries + 1) x timeout`` plus the
        backoff); the caller's cancel scope bounds the whole call, retries included (wrap the
        call in ``trio.fail_after`` / ``move_on_after`` for a total bound). The earlier deadline
        wins and the remaining budget travels to the callee. ``retries`` retries retryable
        errors (a timeout is one) with exponential backoff, preferring another node. ``node_id`` calls that node only. ``stream`` is the request
        body. ``idle_timeout`` bounds the gap between chunks of this call's streams (the
        request stream's own setting and the broker's ``stream_idle_timeout`` otherwise); the
        call timeout never bounds a transfer, only the wait for the response. ``parent_ctx``
        makes this a nested call of that context (as ``ctx.call`` does): meta starts from a
        copy of the parent's and merges back into it. ``fallback``: a value, or a callable
        given ``(parent_ctx, error)`` (sync or async), answers in place of the final error.

        A caller that stops waiting (its cancel scope, its ``timeout``) cancels the callee's
        handler on the native transports (a CANCEL frame); over NATS the handler runs on until
        its budget ends, as in Moleculer. A call with a request stream aborts that stream.
        """
        caller = self._caller
        if caller.direct and fallback is None and self._running:  # one coroutine frame fewer
            return await caller.attempts(action, params, meta, headers, timeout, retries, node_id, stream,
                                         idle_timeout, parent_ctx)
        return await caller.call(action, params, meta, headers, timeout, retries, node_id, stream,
                                 idle_timeout, parent_ctx, fallback)

    async def mcall(self, calls: Mapping[str, Any] | Sequence[Any], *, settled: bool = False,
                    parent_ctx: Context | None = None) -> Any:
        """Several calls at once, as Moleculer's ``mcall``: ``calls`` is a list or a dict (its
        keys name the results) of ``{"action": ..., "params": ..., "options": {...}}`` (options
        are :meth:`call`'s keywords) or ``(action, params)`` pairs. Returns the results in the
        same shape. The first failure cancels the others and is raised, unless
        ``settled=True``: then every call runs to its end and each result is
        ``{"status": "fulfilled", "value": ...}`` or ``{"status": "rejected", "reason": error}``.
        """
        items = list(calls.items()) if isinstance(calls, Mapping) else list(enumerate(calls))
        specs = [(key, *_call_spec(item)) for key, item in items]
        results: dict[Any, Any] = {}
        failure: list[BaseException] = []

        async def one(key: Any, action: str, params: Any, options: dict[str, Any],
                      scope: trio.CancelScope) -> None:
            try:
                value = await self.call(action, params, parent_ctx=parent_ctx, **options)
            except Exception as exc:
                if settled:
                    results[key] = {"status": "rejected", "reason": exc}
                elif not failure:
                    failure.append(exc)
                    scope.cancel()
                return
            results[key] = {"status": "fulfilled", "value": value} if settled else value

        async with trio.open_nursery() as nursery:
            for key, action, params, options in specs:
                nursery.start_soon(one, key, action, params, options, nursery.cancel_scope)
        if failure:
            raise failure[0]
        if isinstance(calls, Mapping):
            return {key: results[key] for key, _ in items}
        return [results[key] for key, _ in items]

    # --- events -------------------------------------------------------------------------

    async def emit(self, event: str, data: Any = None, *, groups: str | list[str] | None = None,
                   meta: dict[str, Any] | None = None, parent_ctx: Context | None = None,
                   headers: dict[str, Any] | None = None) -> None:
        """Deliver ``event`` to one handler per group (balanced; ``groups`` limits them).
        ``parent_ctx`` makes it a child of that context (as ``ctx.emit`` does); ``headers``
        reach the handlers' ``ctx.headers`` (over protocol v5)."""
        if not self._running:
            raise BrokerNotRunningError("the broker is not running (use 'async with Broker(...)')")
        self._events_emitted += 1
        if self._meter is not None:
            self._meter.count_emit(event, False)
        await self._emit_chain(event, data, EventOptions(groups, meta, parent_ctx, headers))

    async def broadcast(self, event: str, data: Any = None, *, groups: str | list[str] | None = None,
                        meta: dict[str, Any] | None = None, parent_ctx: Context | None = None,
                        headers: dict[str, Any] | None = None) -> None:
        """Deliver ``event`` to every handler on every node."""
        if not self._running:
            raise BrokerNotRunningError("the broker is not running (use 'async with Broker(...)')")
        self._events_broadcast += 1
        if self._meter is not None:
            self._meter.count_emit(event, True)
        await self._broadcast_chain(event, data, EventOptions(groups, meta, parent_ctx, headers))

    async def broadcast_local(self, event: str, data: Any = None, *, groups: str | list[str] | None = None,
                              meta: dict[str, Any] | None = None) -> None:
        """Deliver ``event`` to every handler of this broker only."""
        if not self._running:
            raise BrokerNotRunningError("the broker is not running (use 'async with Broker(...)')")
        self._events_broadcast += 1
        if self._meter is not None:
            self._meter.count_emit(event, True)
        group_list = [groups] if isinstance(groups, str) else groups
        for ep in self.registry.event_endpoints(event):
            if ep.local and (group_list is None or ep.group in group_list):
                self._server.spawn_event(ep.spec, event, data, meta or {}, None, self.node_id, group_list, self,
                                         broadcast=True)
        await trio.lowlevel.checkpoint()

    async def _emit_core(self, event: str, data: Any, opts: EventOptions) -> None:
        await self._send_event(event, data, opts, broadcast=False)

    async def _broadcast_core(self, event: str, data: Any, opts: EventOptions) -> None:
        await self._send_event(event, data, opts, broadcast=True)

    async def _send_event(self, event: str, data: Any, opts: EventOptions, *, broadcast: bool) -> None:
        groups, meta, parent, headers = opts.groups, opts.meta, opts.parent_ctx, opts.headers
        group_list = [groups] if isinstance(groups, str) else (list(groups) if groups else None)
        endpoints: list[Any] = []
        if broadcast:
            endpoints = [ep for ep in self.registry.event_endpoints(event)
                         if group_list is None or ep.group in group_list]
        if parent is not None:
            event_meta = dict(parent.meta)
            if meta:
                event_meta.update(meta)
        else:
            event_meta = dict(meta) if meta else {}
        if not broadcast and self.disable_balancer:
            # Moleculer's disableBalancer: one EVENTB per group, and the bus's queue group
            # picks the listener (this node's own included).
            if group_list is None:
                group_list = sorted({ep.group for ep in self.registry.event_endpoints(event)})
            for group in group_list:
                try:
                    self.transit.send_balanced_event(self._next_id(), event, data, group, event_meta,
                                                     parent, headers)
                except NerveError as exc:
                    self.logger.warning("event %s to group %s not sent: %r", event, group, exc)
            await trio.lowlevel.checkpoint()
            return
        if not broadcast:
            # A strategy that reads the call (shard) sees the event's data and meta, not the
            # context that emits it.
            view = _EventView(event, data, event_meta) if self._strategy_reads_calls else parent
            endpoints = self.registry.pick_per_group(event, group_list, view)  # type: ignore[arg-type]
        remote: dict[str, list[str]] = {}
        for ep in endpoints:
            if ep.local:
                self._server.spawn_event(ep.spec, event, data, dict(event_meta), parent, self.node_id,
                                         group_list, self, headers=dict(headers) if headers else None,
                                         broadcast=broadcast)
            else:
                remote.setdefault(ep.node_id, []).append(ep.group)
        for node, node_groups in remote.items():
            try:
                self.transit.send_event(node, self._next_id(), event, data,
                                        group_list if broadcast else sorted(set(node_groups)),
                                        broadcast, event_meta, parent, headers)
            except NerveError as exc:
                self.logger.warning("event %s to %s not sent: %r", event, node, exc)
        if remote:
            # Backpressure (and the checkpoint): wait while a connection's queue is over its mark.
            for node in remote:
                await self.transport.wait_writable(node)
        else:
            await trio.lowlevel.checkpoint()

    def _node_event(self, name: str, node_id: str, *, unexpected: bool) -> None:
        if not self._running:
            return
        data = {"node": {"id": node_id}, "unexpected": unexpected}
        for ep in self.registry.event_endpoints(name):
            if ep.local:
                self._server.spawn_event(ep.spec, name, data, {}, None, self.node_id, None, self, broadcast=True)
        self._services_updated()

    async def ping(self, node_id: str, timeout: float = 2.0) -> float:
        """Round-trip time to ``node_id`` in seconds (PING/PONG packets)."""
        return await self.transit.ping(node_id, timeout)


def _call_spec(item: Any) -> tuple[str, Any, dict[str, Any]]:
    """One call of ``mcall``: ``{"action", "params", "options"}`` or ``(action, params)``."""
    if isinstance(item, Mapping):
        action = item.get("action")
        params = item.get("params")
        options = item.get("options") or {}
    elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 3:
        action, params, options = (*item, None, {})[:3] if len(item) < 3 else item
        options = options or {}
    else:
        raise BrokerOptionsError(f"mcall: a call is a dict or an (action, params) pair, not {item!r}")
    if not isinstance(action, str):
        raise BrokerOptionsError(f"mcall: 'action' must be a string, not {action!r}")
    if not isinstance(options, Mapping):
        raise BrokerOptionsError(f"mcall: 'options' must be a dict, not {options!r}")
    return action, params, dict(options)


class _EventView:
    """What a strategy with ``needs_context`` sees of an emitted event."""

    __slots__ = ("event", "params", "meta")

    def __init__(self, event: str, params: Any, meta: dict[str, Any]) -> None:
        self.event = event
        self.params = params
        self.meta = meta


class _Port:
    """The broker as its transit sees it (``nerve.transit.NodePort``): settings and the few
    things the transit tells the node."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self.api = broker
        self.node_id = broker.node_id
        self.namespace = broker.namespace
        self.metadata = broker.metadata
        self.registry = broker.registry
        self.handlers = broker._handlers
        self.stream_window = broker.stream_window
        self.max_chunk = broker.max_chunk
        self.stream_idle_timeout = broker.stream_idle_timeout
        self.max_pending_requests = broker.max_pending_requests
        self.max_peer_requests = broker.max_peer_requests
        self.max_peer_streams = broker.max_peer_streams
        self.max_stream_buffer = broker.max_stream_buffer
        self.disable_balancer = broker.disable_balancer
        self.heartbeat_interval = broker.heartbeat_interval
        self.heartbeat_timeout = broker.heartbeat_timeout
        self.meter = broker._meter
        self.local_action = broker._local_actions.get
        self.action_failed = broker._server.action_failed

    def describe_services(self) -> list[dict[str, Any]]:
        return self._broker.describe_services()

    def event_received(self, sender: str, pkt: Any) -> None:
        self._broker._server.remote_event(sender, pkt, self._broker)

    def node_event(self, name: str, node_id: str, *, unexpected: bool) -> None:
        self._broker._node_event(name, node_id, unexpected=unexpected)

    def services_changed(self) -> None:
        self._broker._services_updated()

    def watch_stream(self, ctx: Context | None, stream: PacketStream) -> None:
        self._broker.middlewares.watch(ctx, stream)
