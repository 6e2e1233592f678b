"""Middleware: user code around every call, served action, event and lifecycle step.

Theory of operation. A broker is created with a fixed list of middlewares. Wrapping hooks
(``call``, ``local_action``, ``remote_action``, ``emit``, ``broadcast``, ``local_event``)
are called once per handler when its chain is built, never per call: each gets the next
handler and returns the one that replaces it. The list is applied from last to first, so the
first registered middleware ends up outermost (a call enters it first and leaves it last, as
in Moleculer). A hook a middleware does not override is not in the chain at all, and with no
middleware the chain is the bare handler: nothing is paid for what is not used.

:class:`Chain` holds the list and builds the wrapped handlers; the broker keeps one, the call
path (``nerve._calls``) and the serving path (``nerve._serving``) ask it for their handlers.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nerve.context import Context
    from nerve.streams import PacketStream

__all__ = [
    "ActionInfo",
    "CallOptions",
    "EventInfo",
    "EventOptions",
    "Middleware",
]

log = logging.getLogger("nerve.middleware")

#: ``async (ctx) -> result``: serving or sending one action call
ActionHandler = Callable[["Context"], Awaitable[Any]]
#: ``async (action, params, opts) -> result``: ``broker.call``
CallHandler = Callable[[str, Any, "CallOptions"], Awaitable[Any]]
#: ``async (event, data, opts) -> None``: ``broker.emit`` / ``broker.broadcast``
EmitHandler = Callable[[str, Any, "EventOptions"], Awaitable[None]]
#: ``async (ctx) -> None``: serving one event
EventHandler = Callable[["Context"], Awaitable[None]]


@dataclass(frozen=True)
class ActionInfo:
    """What a middleware knows of an action: the same on every node (properties travel in INFO)."""

    name: str
    service: str
    node_id: str
    local: bool
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EventInfo:
    """What a middleware knows of an event subscription served here."""

    name: str
    group: str
    service: str
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class CallOptions:
    """The options of one ``broker.call`` / ``ctx.call``, as ``call`` middlewares see them
    (they may change them before calling ``next``)."""

    meta: dict[str, Any] | None = None
    headers: dict[str, Any] | None = None
    timeout: float | None = None
    retries: int | None = None
    node_id: str | None = None
    stream: PacketStream | None = None
    parent_ctx: Context | None = None
    fallback: Any = None
    idle_timeout: float | None = None


@dataclass
class EventOptions:
    """The options of one ``emit`` / ``broadcast``."""

    groups: str | list[str] | None = None
    meta: dict[str, Any] | None = None
    parent_ctx: Context | None = None
    #: travel in the EVENT packet (protocol v5) and reach the handlers' ``ctx.headers``
    headers: dict[str, Any] | None = None


class Middleware:
    """Base class of middlewares: override the hooks you need (see ``docs/middleware.md``).

    Wrapping hooks return the handler that replaces ``next`` (or ``next`` itself). Lifecycle
    hooks may be plain or ``async`` methods.
    """

    #: Shown in logs; defaults to the class name.
    name: str | None = None

    # --- wrapping hooks (called once per handler when its chain is built) ---------------

    def call(self, next: CallHandler) -> CallHandler:
        """Wrap ``broker.call`` / ``ctx.call``: ``next(action, params, opts)`` makes the call."""
        return next

    def local_action(self, next: ActionHandler, action: ActionInfo) -> ActionHandler:
        """Wrap serving ``action`` on this node (for any caller): ``next(ctx)`` runs the rest."""
        return next

    def remote_action(self, next: ActionHandler, action: ActionInfo) -> ActionHandler:
        """Wrap sending a call of ``action`` to another node: ``next(ctx)`` sends it."""
        return next

    def emit(self, next: EmitHandler) -> EmitHandler:
        """Wrap ``emit``: ``next(event, data, opts)`` delivers it."""
        return next

    def broadcast(self, next: EmitHandler) -> EmitHandler:
        """Wrap ``broadcast``: ``next(event, data, opts)`` delivers it."""
        return next

    def local_event(self, next: EventHandler, event: EventInfo) -> EventHandler:
        """Wrap serving ``event`` on this node: ``next(ctx)`` runs the handler."""
        return next

    # --- stream observers (per chunk; keep them cheap) -----------------------------------

    def stream_sent(self, ctx: Context | None, stream: PacketStream, nbytes: int) -> None:
        """A chunk of ``nbytes`` of a call's stream left this node's producer."""

    def stream_received(self, ctx: Context | None, stream: PacketStream, nbytes: int) -> None:
        """A reader on this node took a chunk of ``nbytes`` of a call's stream."""

    # --- lifecycle ------------------------------------------------------------------------

    def created(self, broker: Any) -> None:
        """The broker was created (its options are set; nothing runs yet)."""

    async def started(self, broker: Any) -> None:
        """The broker started (before its services' ``started``)."""

    async def stopped(self, broker: Any) -> None:
        """The broker stopped (after its services' ``stopped``); in reverse order."""

    async def service_started(self, service: Any) -> None:
        """A service of this broker started."""

    async def service_stopped(self, service: Any) -> None:
        """A service of this broker stopped."""

    def __repr__(self) -> str:
        return f"<{self.name or type(self).__name__}>"


def _overrides(mw: Middleware, hook: str) -> bool:
    return getattr(type(mw), hook, None) is not getattr(Middleware, hook)


async def maybe_await(value: Any) -> Any:
    """``value``, awaited if it is awaitable (hooks, guards and pipes may be sync or async)."""
    if inspect.isawaitable(value):
        return await value
    return value


class Chain:
    """The broker's middlewares, and the wrapped handlers built from them."""

    def __init__(self, middlewares: Sequence[Middleware]) -> None:
        for mw in middlewares:
            if not isinstance(mw, Middleware):
                from nerve.errors import BrokerOptionsError

                raise BrokerOptionsError(f"{mw!r} is not a nerve.Middleware (middlewares=[...])")
        self.middlewares: tuple[Middleware, ...] = tuple(middlewares)
        self._by_hook: dict[str, tuple[Middleware, ...]] = {}
        for hook in ("call", "local_action", "remote_action", "emit", "broadcast", "local_event",
                     "stream_sent", "stream_received", "created", "started", "stopped",
                     "service_started", "service_stopped"):
            self._by_hook[hook] = tuple(mw for mw in self.middlewares if _overrides(mw, hook))
        #: whether any middleware wraps these (when not, the call path takes its fast lanes)
        self.wraps_call = bool(self._by_hook["call"])
        self.wraps_remote = bool(self._by_hook["remote_action"])
        self.watches_streams = bool(self._by_hook["stream_sent"] or self._by_hook["stream_received"])
        #: the broker's ``nerve._metering.Meter`` when it has metrics on (streams are counted)
        self.meter: Any = None

    def _wrap(self, hook: str, handler: Any, *extra: Any) -> Any:
        for mw in reversed(self._by_hook[hook]):  # the first registered ends outermost
            wrapped = getattr(mw, hook)(handler, *extra)
            if not callable(wrapped):
                from nerve.errors import BrokerOptionsError

                raise BrokerOptionsError(f"{mw!r}.{hook} returned {wrapped!r}, not a handler")
            handler = wrapped
        return handler

    def wrap_call(self, handler: CallHandler) -> CallHandler:
        return self._wrap("call", handler)  # type: ignore[no-any-return]

    def wrap_local_action(self, handler: ActionHandler, info: ActionInfo) -> ActionHandler:
        return self._wrap("local_action", handler, info)  # type: ignore[no-any-return]

    def wrap_remote_action(self, handler: ActionHandler, info: ActionInfo) -> ActionHandler:
        return self._wrap("remote_action", handler, info)  # type: ignore[no-any-return]

    def wrap_emit(self, handler: EmitHandler) -> EmitHandler:
        return self._wrap("emit", handler)  # type: ignore[no-any-return]

    def wrap_broadcast(self, handler: EmitHandler) -> EmitHandler:
        return self._wrap("broadcast", handler)  # type: ignore[no-any-return]

    def wrap_local_event(self, handler: EventHandler, info: EventInfo) -> EventHandler:
        return self._wrap("local_event", handler, info)  # type: ignore[no-any-return]

    def watch(self, ctx: Context | None, stream: Any) -> None:
        """Tell the stream hooks (and the broker's meter) of every chunk ``stream`` sends or
        receives on this node."""
        if stream is None:
            return
        meter = self.meter
        if meter is not None:
            meter.stream_watched(stream)
            if self.watches_streams:
                def sent(n: int) -> None:
                    meter.stream_sent(n)
                    self.stream_sent(ctx, stream, n)

                def received(n: int) -> None:
                    meter.stream_received(n)
                    self.stream_received(ctx, stream, n)

                stream.watch(sent=sent, received=received)
            else:
                stream.watch(sent=meter.stream_sent, received=meter.stream_received)
        elif self.watches_streams:
            stream.watch(sent=lambda n: self.stream_sent(ctx, stream, n),
                         received=lambda n: self.stream_received(ctx, stream, n))
        else:
            return
        if stream.bytes_received and self.watches_streams:
            # a request stream's first chunks may arrive before its handler runs
            self.stream_received(ctx, stream, stream.bytes_received)

    def stream_sent(self, ctx: Context | None, stream: PacketStream, nbytes: int) -> None:
        for mw in self._by_hook["stream_sent"]:
            mw.stream_sent(ctx, stream, nbytes)

    def stream_received(self, ctx: Context | None, stream: PacketStream, nbytes: int) -> None:
        for mw in self._by_hook["stream_received"]:
            mw.stream_received(ctx, stream, nbytes)

    def created(self, broker: Any) -> None:
        for mw in self._by_hook["created"]:
            mw.created(broker)

    async def started(self, broker: Any) -> None:
        for mw in self._by_hook["started"]:
            await maybe_await(mw.started(broker))

    async def stopped(self, broker: Any) -> None:
        for mw in reversed(self._by_hook["stopped"]):
            try:
                await maybe_await(mw.stopped(broker))
            except Exception:
                log.exception("middleware %r failed in stopped()", mw)

    async def service_started(self, service: Any) -> None:
        for mw in self._by_hook["service_started"]:
            await maybe_await(mw.service_started(service))

    async def service_stopped(self, service: Any) -> None:
        for mw in reversed(self._by_hook["service_stopped"]):
            try:
                await maybe_await(mw.service_stopped(service))
            except Exception:
                log.exception("middleware %r failed in service_stopped()", mw)
