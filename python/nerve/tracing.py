"""Tracing: OpenTelemetry spans for calls, served actions, events and stream transfers.

Theory of operation. :class:`Tracing` is a middleware (``nerve.middleware``) written against
``opentelemetry-api`` only; what is recorded, sampled and exported is up to the SDK the
application configures. Each wrapping hook, when its chain is built, asks for a tracer; when
there is none (no ``tracer_provider=`` and the API's global provider is still its proxy with no
SDK behind it, or a no-op provider) it returns ``next`` itself, so handlers built then pay
nothing per call. Otherwise every handler it wraps opens one span:

    hook            span kind   parent                                        carries context on
    ==============  ==========  ============================================  ==================
    remote_action   CLIENT      the current span (else a ``traceparent``      injects into the
                                the caller put in ``headers=``)               REQ's headers
    local_action    SERVER      a peer's REQ: its headers' ``traceparent``,   attaches the span
                                else Moleculer's requestID / parentID, else   while the handler
                                none; a call of this node: the current span   runs
    emit/broadcast  PRODUCER    the current span                              injects into the
                                                                              EVENT's headers
    local_event     CONSUMER    the event's headers, else Moleculer's ids,    attaches the span
                                else none (never the pool's current span)     while it runs
    stream_sent     INTERNAL    the span of the call the stream belongs to    -

A span opened by a wrapper is attached (``opentelemetry.context.attach``) in the task that
runs the handler and detached in the same task before the wrapper returns, whatever way it
leaves; nothing is held across a ``yield`` (open-telemetry/opentelemetry-python#2606). Handler
workers are reused, but each request runs in a fresh copy of the broker's contextvars and a
served peer's request never takes its parent from the current context, so nothing attached
for one request reaches the next.

A stream's span is opened by its first chunk on the node that produces it and is a child of
the call's span, found in ``ctx.locals``; the producer's closed callback ends it with the bytes
and chunks sent (one still open when its broker stops is ended then); a stream of a call that
is not traced has none. The bytes a served handler's request stream had received when it
returned are set on its SERVER span. Peers' headers are read with a getter that hands a
propagator only strings of at most 8 KiB, and a propagator's failure is swallowed, so a
garbage ``traceparent`` (wrong type, huge, malformed) never fails a call: it gets a fresh root.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.propagators.textmap import Getter, TextMapPropagator
    from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags
    from opentelemetry.trace.status import Status, StatusCode
    from opentelemetry.util.types import AttributeValue
except ImportError as exc:
    raise ImportError(
        "nerve.tracing needs the OpenTelemetry API (nerve's 'tracing' extra): "
        "pip install opentelemetry-api") from exc

import trio

from nerve.errors import NerveError
from nerve.middleware import (
    ActionHandler,
    ActionInfo,
    EmitHandler,
    EventHandler,
    EventInfo,
    EventOptions,
    Middleware,
)
from nerve.streams import PacketStream

if TYPE_CHECKING:
    from opentelemetry.context import Context as OtelContext

    from nerve.context import Context

__all__ = ["Tracing"]

log = logging.getLogger("nerve.tracing")

#: ``rpc.system`` / ``messaging.system``: nerve speaks Moleculer's protocol
SYSTEM = "moleculer"

#: keys of ``ctx.locals`` this middleware uses
_SPAN = "nerve.tracing.span"
_RESPONSE = "nerve.tracing.response"

#: a header value longer than this is not trace context (W3C tracestate: 32 members of at
#: most 256 characters; traceparent: 55)
_MAX_HEADER = 8192
#: peer-supplied ids set as attributes are cut to this length
_MAX_ID = 128

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{32}")

try:
    from importlib.metadata import version as _dist_version

    _VERSION: str | None = _dist_version("nerve")
except Exception:  # pragma: no cover - not installed as a distribution
    _VERSION = None


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads trace context from a call's or event's headers, which a peer may fill with
    anything: only strings of a sane length are seen."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, str) and len(value) <= _MAX_HEADER:
            return [value]
        return None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [key for key in carrier if isinstance(key, str)]


_GETTER = _HeaderGetter()


class _Transfer:
    """One stream's transfer, as its producer's node sees it."""

    __slots__ = ("span", "bytes", "chunks", "broker", "open")

    def __init__(self, span: Span, broker: Any) -> None:
        self.span = span
        self.bytes = 0
        self.chunks = 0
        self.broker = broker
        self.open = True

    def end(self) -> None:
        if self.open:
            self.open = False
            self.span.set_attribute("nerve.stream.bytes", self.bytes)
            self.span.set_attribute("nerve.stream.chunks", self.chunks)
            self.span.end()


#: the marker of a stream whose call is not traced (its chunks are not looked at again)
_UNTRACED: Any = object()


class Tracing(Middleware):
    """OpenTelemetry spans for this broker's calls, served actions, events and streams.

    ``tracer_provider``: where spans go; by default the API's global provider, looked up each
    time a handler's chain is built (configure the SDK before the ``Broker`` is created: a
    chain built while no SDK is set is not traced). ``propagator``: how trace context is
    written into and read from headers; by default the API's global one (W3C
    ``traceparent`` / ``tracestate`` and ``baggage`` unless ``OTEL_PROPAGATORS`` says
    otherwise). Register it first (``middlewares=[Tracing(), ...]``) so that its spans cover
    the other middlewares. See ``docs/observability.md``.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None, *,
                 propagator: TextMapPropagator | None = None) -> None:
        self._provider = tracer_provider
        self._propagator = propagator
        self._tracer_source: trace.TracerProvider | None = None
        self._tracer: trace.Tracer | None = None
        #: some chain was built with a tracer (the stream hooks look at nothing until then)
        self._active = False
        self._transfers: weakref.WeakKeyDictionary[PacketStream, Any] = weakref.WeakKeyDictionary()

    # --- wrapping hooks -------------------------------------------------------------------

    def remote_action(self, next: ActionHandler, action: ActionInfo) -> ActionHandler:
        tracer = self._tracer_now()
        if tracer is None:
            return next
        name, service, method = _rpc_names(action.name, action.service)
        static = {"rpc.system": SYSTEM, "rpc.service": service, "rpc.method": method,
                  "nerve.action": action.name, "nerve.peer.node_id": action.node_id}
        inject = self._inject
        parent_for_call = self._parent_for_call

        async def traced_remote_action(ctx: Context) -> Any:
            headers = ctx.headers
            if not isinstance(headers, dict):
                headers = ctx.headers = {}
            parent = parent_for_call(headers)
            span = tracer.start_span(name, context=parent, kind=SpanKind.CLIENT, attributes={
                **static, "nerve.node_id": ctx.node_id or "", "nerve.call_id": _short(ctx.id),
                "nerve.request_id": _short(ctx.request_id)})
            ctx.locals[_SPAN] = span
            # Moleculer's tracing flag, for moleculer.js callees (nerve's read traceparent)
            ctx.tracing = span.get_span_context().trace_flags.sampled
            current = trace.set_span_in_context(span, parent)
            inject(headers, current)
            with _Active(span, current):
                return await next(ctx)

        return traced_remote_action

    def local_action(self, next: ActionHandler, action: ActionInfo) -> ActionHandler:
        tracer = self._tracer_now()
        if tracer is None:
            return next
        name, service, method = _rpc_names(action.name, action.service)
        static = {"rpc.system": SYSTEM, "rpc.service": service, "rpc.method": method,
                  "nerve.action": action.name, "nerve.node_id": action.node_id}
        here = action.node_id
        remote_parent = self._remote_parent
        parent_for_call = self._parent_for_call

        async def traced_local_action(ctx: Context) -> Any:
            remote = ctx.node_id != here
            parent = remote_parent(ctx) if remote else parent_for_call(ctx.headers)
            attributes: dict[str, AttributeValue] = {**static, "nerve.call.remote": remote, "nerve.call_id": _short(ctx.id),
                          "nerve.request_id": _short(ctx.request_id)}
            if remote:
                attributes["nerve.peer.node_id"] = _short(ctx.node_id)
            span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
            locals_ = ctx.locals
            locals_[_SPAN] = span
            try:
                with _Active(span, trace.set_span_in_context(span, parent), end=False):
                    result = await next(ctx)
                if isinstance(result, PacketStream):
                    locals_[_RESPONSE] = result
                return result
            finally:
                request_stream = ctx.stream
                if isinstance(request_stream, PacketStream) and request_stream.bytes_received:
                    span.set_attribute("nerve.stream.bytes_received", request_stream.bytes_received)
                span.end()

        return traced_local_action

    def emit(self, next: EmitHandler) -> EmitHandler:
        return self._producer(next, "emit")

    def broadcast(self, next: EmitHandler) -> EmitHandler:
        return self._producer(next, "broadcast")

    def _producer(self, next: EmitHandler, operation: str) -> EmitHandler:
        tracer = self._tracer_now()
        if tracer is None:
            return next
        inject = self._inject
        parent_for_call = self._parent_for_call

        async def traced_emit(event: str, data: Any, opts: EventOptions) -> None:
            headers = dict(opts.headers) if isinstance(opts.headers, dict) else {}
            parent = parent_for_call(headers)
            span = tracer.start_span(f"{operation} {event}", context=parent, kind=SpanKind.PRODUCER,
                                     attributes={"messaging.system": SYSTEM,
                                                 "messaging.operation.type": "send",
                                                 "messaging.operation.name": operation,
                                                 "messaging.destination.name": event})
            current = trace.set_span_in_context(span, parent)
            inject(headers, current)
            opts.headers = headers
            with _Active(span, current):
                await next(event, data, opts)

        return traced_emit

    def local_event(self, next: EventHandler, event: EventInfo) -> EventHandler:
        tracer = self._tracer_now()
        if tracer is None:
            return next
        name = f"process {event.name}"
        static = {"messaging.system": SYSTEM, "messaging.operation.type": "process",
                  "messaging.operation.name": "process", "messaging.consumer.group.name": event.group,
                  "nerve.service": event.service}
        remote_parent = self._remote_parent

        async def traced_local_event(ctx: Context) -> None:
            parent = remote_parent(ctx)
            span = tracer.start_span(name, context=parent, kind=SpanKind.CONSUMER, attributes={
                **static, "messaging.destination.name": ctx.event or event.name,
                "nerve.peer.node_id": _short(ctx.node_id), "nerve.request_id": _short(ctx.request_id)})
            ctx.locals[_SPAN] = span
            with _Active(span, trace.set_span_in_context(span, parent)):
                await next(ctx)

        return traced_local_event

    # --- stream observers -----------------------------------------------------------------

    def stream_sent(self, ctx: Context | None, stream: PacketStream, nbytes: int) -> None:
        if not self._active:
            return
        transfer = self._transfers.get(stream)
        if transfer is None:
            transfer = self._transfers[stream] = self._start_transfer(ctx, stream)
        if transfer is not _UNTRACED:
            transfer.bytes += nbytes
            transfer.chunks += 1

    def _start_transfer(self, ctx: Context | None, stream: PacketStream) -> Any:
        tracer = self._tracer
        parent_span = ctx.locals.get(_SPAN) if ctx is not None else None
        if tracer is None or ctx is None or parent_span is None or stream.producer_done:
            return _UNTRACED
        response = ctx.locals.get(_RESPONSE) is stream
        name, service, method = _rpc_names(ctx.action or "", ctx.service or "")
        span = tracer.start_span(
            f"{name} stream", context=trace.set_span_in_context(parent_span), kind=SpanKind.INTERNAL,
            attributes={"rpc.system": SYSTEM, "rpc.service": service, "rpc.method": method,
                        "nerve.stream.direction": "response" if response else "request"})
        transfer = _Transfer(span, ctx.broker)
        stream.add_closed_callback(transfer.end)
        return transfer

    # --- lifecycle ------------------------------------------------------------------------

    async def stopped(self, broker: Any) -> None:
        """The broker stopped: a stream span of its calls still open is ended now."""
        for transfer in list(self._transfers.values()):
            if transfer is not _UNTRACED and transfer.broker is broker and transfer.open:
                transfer.span.set_attribute("nerve.stream.unfinished", True)
                transfer.end()
        await trio.lowlevel.checkpoint()

    # --- context --------------------------------------------------------------------------

    def _tracer_now(self) -> trace.Tracer | None:
        """The tracer for a chain built now, or None when nothing would be recorded."""
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            # The API's own: a proxy with no SDK behind it yet, or the no-op one.
            return None
        if provider is not self._tracer_source:
            tracer = provider.get_tracer("nerve", _VERSION)
            if isinstance(tracer, (trace.NoOpTracer, trace.ProxyTracer)):  # an SDK switched off
                return None
            self._tracer_source, self._tracer = provider, tracer
        self._active = True
        return self._tracer

    def _inject(self, headers: dict[str, Any], current: OtelContext) -> None:
        propagator = self._propagator or propagate.get_global_textmap()
        try:
            propagator.inject(headers, context=current)
        except Exception:  # a third-party propagator must not fail the call
            log.debug("trace context not injected", exc_info=True)

    def _extract(self, headers: Any) -> OtelContext | None:
        """The trace context in ``headers``, or None if they carry no valid one."""
        if not isinstance(headers, dict) or not headers:
            return None
        propagator = self._propagator or propagate.get_global_textmap()
        try:
            extracted = propagator.extract(headers, context=otel_context.Context(), getter=_GETTER)
        except Exception:  # a peer's garbage, or a third-party propagator's failure
            log.debug("trace context not extracted", exc_info=True)
            return None
        if trace.get_current_span(extracted).get_span_context().is_valid:
            return extracted
        return None

    def _parent_for_call(self, headers: Any) -> OtelContext | None:
        """The parent of a span opened on the caller's side: the current span, else a trace
        context the caller put in the headers, else none (None: the current context)."""
        if trace.get_current_span().get_span_context().is_valid:
            return None
        return self._extract(headers)

    def _remote_parent(self, ctx: Context) -> OtelContext:
        """The parent of a span served for a peer: never the current context."""
        extracted = self._extract(ctx.headers)
        if extracted is not None:
            return extracted
        moleculer = moleculer_parent(ctx.request_id, ctx.parent_id, sampled=ctx.tracing is not False)
        if moleculer is not None:
            return trace.set_span_in_context(NonRecordingSpan(moleculer), otel_context.Context())
        return otel_context.Context()


def moleculer_parent(request_id: Any, parent_id: Any, *, sampled: bool = True) -> SpanContext | None:
    """The remote parent Moleculer's ids stand for, when both are UUIDs (or 32 hex digits):
    trace id = the 128 bits of ``request_id``, span id = the first 64 bits of ``parent_id``
    (the parent context's id, which is its span's id in Moleculer's tracer). ``sampled``:
    Moleculer's tracing flag (``ctx.tracing``: False when the caller's tracer did not sample
    the call tree, so a parent-based sampler drops it here too)."""
    if not (isinstance(request_id, str) and isinstance(parent_id, str)
            and _UUID.fullmatch(request_id) and _UUID.fullmatch(parent_id)):
        return None
    trace_id = int(request_id.replace("-", ""), 16)
    span_id = int(parent_id.replace("-", "")[:16], 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT))


def _rpc_names(action: str, service: str) -> tuple[str, str, str]:
    """(span name, rpc.service, rpc.method) of an action: ``users/get`` for ``users.get``."""
    if service and action.startswith(service + "."):
        method = action[len(service) + 1:]
    else:
        service, _, method = action.rpartition(".")
    return f"{service}/{method}", service, method


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= _MAX_ID else text[:_MAX_ID]


class _Active:
    """``with _Active(span, context):`` — ``context`` (holding ``span``) is attached while the
    body runs and detached in the same task however it leaves; a failure marks the span; the
    span is ended (unless ``end=False``: the caller ends it)."""

    __slots__ = ("span", "context", "end", "token")

    def __init__(self, span: Span, context: OtelContext, *, end: bool = True) -> None:
        self.span = span
        self.context = context
        self.end = end

    def __enter__(self) -> None:
        self.token = otel_context.attach(self.context)

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc is not None:
                _failed(self.span, exc)
        finally:
            otel_context.detach(self.token)
            if self.end:
                self.span.end()


def _failed(span: Span, exc: BaseException) -> None:
    """Mark ``span`` as failed by ``exc`` (cancellation included, as an error without a record)."""
    if not span.is_recording():
        return
    if isinstance(exc, trio.Cancelled) or (isinstance(exc, BaseExceptionGroup)
                                           and exc.split(trio.Cancelled)[1] is None):
        span.set_attribute("error.type", "cancelled")
        span.set_status(Status(StatusCode.ERROR, "cancelled"))
        return
    span.record_exception(exc)
    if isinstance(exc, NerveError):
        span.set_attribute("error.type", _short(exc.name))
        if isinstance(exc.code, int):
            span.set_attribute("nerve.error.code", exc.code)
        if exc.type:
            span.set_attribute("nerve.error.type", _short(exc.type))
        if exc.node_id:
            span.set_attribute("nerve.error.node_id", _short(exc.node_id))
        span.set_attribute("nerve.error.retryable", bool(exc.retryable))
    else:
        cls = type(exc)
        span.set_attribute("error.type", cls.__qualname__ if cls.__module__ == "builtins"
                           else f"{cls.__module__}.{cls.__qualname__}")
    description = f"{type(exc).__name__}: {exc}"
    span.set_status(Status(StatusCode.ERROR, description[:512]))
