"""Metrics: a node's counters in Prometheus' format, on a port of its own or in an ASGI app.

Theory of operation. ``Broker(metrics=True)`` (or ``metrics_port=``) gives the broker a
:class:`Metrics`. Counting is done by the node itself, inline and in plain Python
(``nerve._metering``: per action served here, per action called elsewhere, per event handler
and per event emitted, and every chunk of every call's stream); everything else (packets,
bytes on the wire, the registry, the handler pool) is read from ``broker.statistics()``.
Nothing is computed until Prometheus scrapes: :meth:`Metrics.collect` then turns the counters
into metric families, so the counters are exact and a scrape costs calls nothing.

Names follow Moleculer's metrics module (``moleculer.request.total`` becomes
``moleculer_request_total``), with Prometheus' unit suffix where there is a unit
(``moleculer_request_time_seconds``, a histogram in seconds where Moleculer's is in ms);
what Moleculer has no name for is under ``nerve_``. The full list is in
``docs/observability.md``.

Serving: ``metrics_port=9464`` (all interfaces) or ``"127.0.0.1:9464"`` serves ``GET
/metrics`` from the broker's own nursery on trio: a deliberately small HTTP/1.1 responder
(one request per connection, a request head of at most 16 KiB read within 5 s, at most 16
connections at once and 8 from one host; when all are taken, a new connection replaces the
oldest one still sending its head, so clients that connect and say nothing cannot keep a
scraper out; anything malformed is refused with a 4xx). Nothing a client does, and no
collector that raises, reaches the broker. :meth:`Metrics.asgi_app` mounts the same
exposition in an ASGI server (the gateway's ``/metrics``) that runs on the broker's trio
thread: the counters are read without locks.

prometheus-client is an optional dependency (nerve's ``metrics`` extra; or ``pip install
prometheus-client``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import trio

from nerve._metering import BUCKETS, Meter, TimedSlot
from nerve.errors import BrokerOptionsError

if TYPE_CHECKING:
    from nerve.broker import Broker

__all__ = ["Metrics", "parse_listen"]

log = logging.getLogger("nerve.metrics")

#: Limits of the metrics port's responder.
MAX_REQUEST_HEAD = 16 * 1024
HEAD_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0
MAX_CONNECTIONS = 16
MAX_PER_HOST = 8


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - the extra is installed in the test env
        raise BrokerOptionsError("metrics need prometheus-client (nerve's 'metrics' extra): "
                                 "pip install prometheus-client") from exc
    return prometheus_client


def parse_listen(spec: int | str) -> tuple[str, int]:
    """``9464`` (all interfaces), ``":9464"``, ``"127.0.0.1:9464"`` or ``"[::1]:9464"`` as
    (host, port); BrokerOptionsError naming the value otherwise."""
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise BrokerOptionsError(f"metrics_port must be a port or 'HOST:PORT', not {spec!r}")
    if isinstance(spec, int):
        host, port_text = "", str(spec)
    else:
        text = spec.strip()
        if text.startswith("http://"):
            text = text[len("http://"):].rstrip("/")
        if text.startswith("["):
            end = text.find("]")
            if end < 0 or not text[end + 1:].startswith(":"):
                raise BrokerOptionsError(f"metrics address {spec!r}: expected '[HOST]:PORT'")
            host, port_text = text[1:end], text[end + 2:]
        elif ":" in text:
            host, port_text = text.rsplit(":", 1)
        else:
            host, port_text = "", text
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise BrokerOptionsError(f"metrics address {spec!r}: the port must be 0..65535")
    return host, int(port_text)


class Metrics:
    """A broker's metrics (see the module's docstring). Made by ``Broker(metrics=True)``; pass
    your own (``Broker(metrics=Metrics(process=False))``) to choose options.

    ``process``: also export the process' CPU, memory and file descriptors
    (prometheus-client's ``process_*`` metrics).
    """

    def __init__(self, *, process: bool = True) -> None:
        self._prom = _prometheus()
        self.meter = Meter()
        self.process = process
        self._broker: Broker | None = None
        self._listen: tuple[str, int] | None = None
        self._registry: Any = None
        #: ``http://host:port/metrics`` once the metrics port is serving
        self.url: str | None = None

    def bind(self, broker: Broker, port: int | str | None) -> None:
        """Called by the broker this instance belongs to (one broker per Metrics)."""
        if self._broker is not None and self._broker is not broker:
            raise BrokerOptionsError("a Metrics instance belongs to one broker")
        self._broker = broker
        self._listen = parse_listen(port) if port is not None else None

    # --- exposition ---------------------------------------------------------------------------

    @property
    def registry(self) -> Any:
        """A ``prometheus_client.CollectorRegistry`` holding this node's metrics (and the
        process collector if ``process``): register your own metrics in it if you like."""
        if self._registry is None:
            prom = self._prom
            registry = prom.CollectorRegistry(auto_describe=False)
            registry.register(self)
            if self.process:
                prom.ProcessCollector(registry=registry)
            self._registry = registry
        return self._registry

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format, now."""
        return self._prom.generate_latest(self.registry)  # type: ignore[no-any-return]

    def asgi_app(self) -> Any:
        """An ASGI app answering with :meth:`exposition` (mount it at ``/metrics``)."""
        return self._prom.make_asgi_app(registry=self.registry)

    def collect(self) -> Iterator[Any]:
        """prometheus-client's Collector protocol: every metric family, built now."""
        broker = self._broker
        if broker is None:
            return
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        meter = self.meter
        yield from _call_families("moleculer_request", "Requests", ("service", "action", "type"),
                                  [((svc, action, "local"), slot) for (svc, action), slot in list(meter.local.items())]
                                  + [((svc, action, "remote"), slot) for (svc, action), slot in list(meter.remote.items())])
        yield from _call_families("moleculer_event_received", "Event handlers run",
                                  ("event", "service", "group"),
                                  [(key, slot) for key, slot in list(meter.events.items())])
        for name, table, what in (("moleculer_event_emit", meter.emitted, "Events emitted"),
                                  ("moleculer_event_broadcast", meter.broadcast, "Events broadcast")):
            family = CounterMetricFamily(name, what, labels=("event",))
            for event, count in list(table.items()):
                family.add_metric((event,), count)
            yield family

        stats = broker.statistics()
        transit, transport, registry, pool = stats.transit, stats.transport, stats.registry, stats.handler_pool

        def counter(name: str, doc: str, value: float) -> Any:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> Any:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("moleculer_broker_started", "1 while the broker runs", 1 if stats.running else 0)
        yield gauge("moleculer_broker_local_services_total", "Local services", stats.services)
        yield gauge("moleculer_broker_middlewares_total", "Middlewares", len(broker.middlewares.middlewares))
        yield gauge("nerve_broker_uptime_seconds", "Seconds since the broker started", stats.uptime)
        yield counter("nerve_calls", "Calls made by this node (retries count once)", stats.calls)
        yield counter("nerve_calls_failed", "Calls made by this node that failed", stats.calls_failed)
        yield counter("nerve_event_handler_errors", "Event handlers that raised", stats.event_handler_errors)
        yield counter("moleculer_transit_publish", "Packets sent", transit.packets_sent)
        yield counter("moleculer_transit_receive", "Packets received", transit.packets_received)
        yield gauge("moleculer_transit_requests_active", "Calls of this node waiting for an answer",
                    transit.requests_waiting)
        yield gauge("nerve_transit_requests_in_service", "Requests of peers being served",
                    transit.requests_in_service)
        yield counter("nerve_transit_requests_received", "REQ packets received", transit.requests_received)
        yield counter("nerve_transit_requests_rejected", "REQ packets refused before a handler ran",
                      transit.requests_rejected)
        yield counter("nerve_transit_requests_cancelled", "Requests cancelled by their caller", transit.cancelled)
        yield counter("nerve_transit_protocol_errors", "Frames that broke the protocol (each ended "
                      "its connection)", transit.protocol_errors)
        yield gauge("moleculer_transit_streams_send_active", "Streams this node writes to a peer",
                    transit.streams_writing)
        yield gauge("nerve_transit_streams_receive_active", "Streams this node reads from a peer",
                    transit.streams_reading)
        yield gauge("nerve_transit_peers", "Nodes connected", transit.peers)
        yield counter("moleculer_transporter_packets_sent_bytes", "Bytes written to the network",
                      transport.bytes_sent)
        yield counter("moleculer_transporter_packets_received_bytes", "Bytes read from the network",
                      transport.bytes_received)
        yield gauge("nerve_transporter_connections", "Connections (or bus peers) now", transport.connections)
        yield gauge("moleculer_registry_nodes_total", "Nodes known", registry.nodes)
        yield gauge("moleculer_registry_nodes_online_total", "Nodes available", registry.nodes_online)
        yield gauge("moleculer_registry_services_total", "Services", registry.services)
        yield gauge("moleculer_registry_service_endpoints_total", "Service instances", registry.service_endpoints)
        yield gauge("moleculer_registry_actions_total", "Actions", registry.actions)
        yield gauge("moleculer_registry_action_endpoints_total", "Action endpoints", registry.action_endpoints)
        yield gauge("moleculer_registry_events_total", "Events subscribed to", registry.events)
        yield gauge("moleculer_registry_event_endpoints_total", "Event subscriptions", registry.event_endpoints)
        yield gauge("nerve_handler_pool_active", "Handlers queued or running", pool.active)
        yield gauge("nerve_handler_pool_queued", "Handlers queued, not started", pool.queued)
        yield gauge("nerve_handler_pool_workers", "Worker tasks", pool.workers)
        yield gauge("nerve_handler_pool_idle_workers", "Worker tasks parked", pool.idle_workers)
        yield counter("nerve_stream_opened", "Streams of calls on this node", meter.streams_opened)
        yield counter("nerve_stream_sent_bytes", "Stream bytes produced on this node", meter.stream_bytes_sent)
        yield counter("nerve_stream_received_bytes", "Stream bytes that reached a reader on this node",
                      meter.stream_bytes_received)
        yield counter("nerve_stream_sent_chunks", "Stream chunks produced on this node", meter.stream_chunks_sent)
        yield counter("nerve_stream_received_chunks", "Stream chunks that reached a reader on this node",
                      meter.stream_chunks_received)
        yield counter("nerve_stream_credit_wait_seconds", "Seconds producers waited for credit",
                      meter.credit_wait())

    # --- the metrics port -------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Serve the metrics port in ``nursery`` (the broker's), if one was asked for."""
        if self._listen is not None:
            await nursery.start(self._serve)

    async def _serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        host, port = self._listen  # type: ignore[misc]
        try:
            listeners = await trio.open_tcp_listeners(port, host=host or None)
        except OSError as exc:
            raise BrokerOptionsError(f"cannot serve metrics on {host or '*'}:{port}: {exc.strerror or exc}") from exc
        sockname = listeners[0].socket.getsockname()
        shown = host or "0.0.0.0"
        if ":" in shown:
            shown = f"[{shown}]"
        self.url = f"http://{shown}:{sockname[1]}/metrics"
        node = self._broker.node_id if self._broker is not None else "?"
        log.info("node %s serves metrics at %s", node, self.url, extra={"node_id": node})
        #: connections still reading their request head, oldest first: when all the slots are
        #: taken, a new connection takes the oldest of these (a client that connects and says
        #: nothing cannot keep a scraper out)
        waiting: dict[int, trio.CancelScope] = {}
        per_host: dict[str, int] = {}
        active = 0

        async def handle(stream: trio.SocketStream) -> None:
            nonlocal active
            host = _peer_host(stream)
            if per_host.get(host, 0) >= MAX_PER_HOST or (active >= MAX_CONNECTIONS and not waiting):
                await trio.aclose_forcefully(stream)
                return
            if active >= MAX_CONNECTIONS:
                waiting.pop(next(iter(waiting))).cancel()
            active += 1
            per_host[host] = per_host.get(host, 0) + 1
            scope = trio.CancelScope()
            key = id(scope)
            waiting[key] = scope
            try:
                with scope:
                    await self._handle(stream, lambda: waiting.pop(key, None))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the client went away
            except Exception:  # a bug, or a collector of the application's that raised
                log.exception("metrics request failed", extra={"node_id": node})
            finally:
                waiting.pop(key, None)
                active -= 1
                left = per_host[host] - 1
                if left:
                    per_host[host] = left
                else:
                    del per_host[host]
                await trio.aclose_forcefully(stream)

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, handle, listeners)
                task_status.started()
        finally:
            self.url = None

    async def _handle(self, stream: trio.SocketStream, head_read: Any) -> None:
        head = b""
        with trio.move_on_after(HEAD_TIMEOUT):
            while b"\r\n\r\n" not in head and b"\n\n" not in head:
                if len(head) > MAX_REQUEST_HEAD:
                    await _respond(stream, 431, b"request head too large\n")
                    return
                data = await stream.receive_some(4096)
                if not data:
                    return
                head += data
        if b"\r\n\r\n" not in head and b"\n\n" not in head:
            await _respond(stream, 408, b"request timeout\n")
            return
        head_read()
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            await _respond(stream, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            await _respond(stream, 405, b"only GET and HEAD\n", extra=b"Allow: GET, HEAD\r\n")
            return
        path = target.split(b"?", 1)[0]
        if path != b"/metrics":
            await _respond(stream, 404, b"metrics are at /metrics\n")
            return
        try:
            body = self.exposition()
        except Exception:  # a collector registered by the application raised: say so, go on
            log.exception("building the metrics failed")
            await _respond(stream, 500, b"building the metrics failed (see the node's log)\n")
            return
        await _respond(stream, 200, body, content_type=self._prom.CONTENT_TYPE_LATEST.encode(),
                       head_only=method == b"HEAD")


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            408: b"Request Timeout", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error"}


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return "?"


async def _respond(stream: trio.SocketStream, status: int, body: bytes, *,
                   content_type: bytes = b"text/plain; charset=utf-8", extra: bytes = b"",
                   head_only: bool = False) -> None:
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"
            % (status, _REASONS[status], content_type, len(body), extra))
    with trio.move_on_after(SEND_TIMEOUT):
        await stream.send_all(head if head_only else head + body)


def _call_families(name: str, doc: str, labels: tuple[str, ...],
                   slots: Sequence[tuple[tuple[str, ...], TimedSlot]]) -> Iterator[Any]:
    """total / active / error total / time histogram of these slots."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    total = CounterMetricFamily(name, f"{doc}", labels=labels)
    active = GaugeMetricFamily(f"{name}_active", f"{doc}: running now", labels=labels)
    errors = CounterMetricFamily(f"{name}_error", f"{doc}: failed",
                                 labels=(*labels, "errorName", "errorCode", "errorType"))
    times = HistogramMetricFamily(f"{name}_time_seconds", f"{doc}: duration", labels=labels)
    bounds = [repr(float(b)) for b in BUCKETS] + ["+Inf"]
    for key, slot in slots:
        total.add_metric(key, slot.total)
        active.add_metric(key, slot.active)
        for (ename, ecode, etype), count in list(slot.errors.items()):
            errors.add_metric((*key, ename, ecode, etype), count)
        cumulative, running = [], 0
        for bound, count in zip(bounds, list(slot.buckets)):
            running += count
            cumulative.append((bound, running))
        times.add_metric(key, cumulative, sum_value=slot.sum)
    yield total
    yield active
    yield errors
    yield times

