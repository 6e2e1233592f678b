"""The gateway's WebSocket endpoint, ``{prefix}/ws``: outside clients (browsers, askr-style
clients) call actions, emit events and receive live events over one socket. This module owns
the socket's message protocol and its limits; calls, events and the access check are the
broker's and the :class:`~nerve.gateway.app.Gateway`'s, never reimplemented here.

Protocol: JSON text frames, one message each. ``id`` is any JSON scalar the client picks
(a string of at most 256 characters); every answer carries the ``id`` of its message.

Client to server::

    {"id": 1, "type": "call", "action": "math.add", "params": {...}, "meta": {...}, "timeout": 500}
    {"id": 2, "type": "emit", "event": "user.created", "params": {...}, "meta": {...}, "groups": ["g"]}
    {"id": 3, "type": "broadcast", "event": "user.created", "params": {...}}
    {"id": 4, "type": "subscribe", "match": ["user.*", "order.**"]}
    {"id": 5, "type": "unsubscribe"}

``params``, ``meta`` (an object), ``timeout`` (milliseconds; 0: the gateway's default),
``groups`` (a string or a list of strings) and ``match`` (default ``["**"]``) may be left
out. Server to client::

    {"id": 1, "type": "result", "response": ..., "meta": {...}}     the callee's meta merged in
    {"id": 1, "type": "error", "error": {"name", "message", "code", "type", "data"}, "meta": {...}}
    {"id": 2, "type": "ack"}                                         emit, broadcast, (un)subscribe
    {"type": "event", "event": "user.created", "data": ..., "nodeID": "node-1"}
    {"type": "overflow"}                                             the last event frame

Calls run concurrently and are answered as they settle, in any order; at most
``max_in_flight`` (64) per socket, a call beyond that is answered at once with a
``QueueIsFullError`` (429). Emits, broadcasts and (un)subscriptions are handled in the order
they arrive. ``subscribe`` replaces the socket's patterns; after the ack of ``unsubscribe`` no
event frame arrives. A client that falls ``event_queue`` events behind gets ``overflow`` and no
more events (subscribe again to resume). A message that is not JSON, not an object, of an
unknown ``type``, with fields of the wrong type, or nested deeper than ``max_depth`` (32) is
answered with an error frame (400; ``id`` null when it could not be read) and the socket
serves on. Actions not ``expose``-d are ``ServiceNotFoundError`` (404); an action answering
with a stream is refused (501: use ``POST {prefix}/call``).

Closes: 1003 for a binary frame, 1009 for a message over ``max_message`` bytes (1 MiB);
invalid UTF-8 is the server's WebSocket layer's to refuse (it drops the connection). The
access check runs when the socket opens: refused, the socket is accepted and closed at once
with ``4000 + code`` (4401, 4403) or 1008, the error's message as the reason.
"""

from __future__ import annotations

import logging
import math
import re
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import trio

from nerve.errors import NerveError, QueueIsFullError, ServiceNotFoundError, error_to_wire
from nerve.streams import PacketStream

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

    from nerve.gateway.app import Gateway

__all__ = ["routes", "WebSocketEndpoint", "WebSocketMessageError"]

log = logging.getLogger("nerve.gateway.ws")

#: close codes (RFC 6455, section 7.4.1)
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009

_OUTBOX = 16  # encoded frames waiting for the socket: beyond, producers wait (backpressure)
_MAX_PATTERNS = 16
_MAX_PATTERN = 200
_STARS = re.compile(r"\*+")


class WebSocketMessageError(NerveError):
    """A WebSocket message the gateway cannot read (not JSON, wrong fields, too deep)."""

    default_code = 400
    default_type = "BAD_MESSAGE"


# --- messages (decoded and checked in one pass: a tagged union of structs) ------------------

Id = Annotated[str, msgspec.Meta(max_length=256)] | int | float | bool | None
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class _Message(msgspec.Struct, tag_field="type", kw_only=True, frozen=True):
    id: Id = None


class Call(_Message, tag="call", frozen=True):
    action: Name
    params: Any = None
    meta: dict[str, Any] | None = None
    timeout: Annotated[float, msgspec.Meta(ge=0)] | None = None


class Emit(_Message, tag="emit", frozen=True):
    event: Name
    params: Any = None
    meta: dict[str, Any] | None = None
    groups: Name | list[Name] | None = None


class Broadcast(Emit, tag="broadcast", frozen=True):
    pass


class Subscribe(_Message, tag="subscribe", frozen=True):
    match: Annotated[list[str], msgspec.Meta(min_length=1, max_length=_MAX_PATTERNS)] = msgspec.field(
        default_factory=lambda: ["**"])


class Unsubscribe(_Message, tag="unsubscribe", frozen=True):
    pass


Message = Call | Emit | Broadcast | Subscribe | Unsubscribe

_decoder = msgspec.json.Decoder(Message)
_any_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def parse(text: str, max_depth: int) -> Message | tuple[Id, WebSocketMessageError]:
    """One client message, or the ``id`` to answer with and why it is refused (no I/O)."""
    try:
        message = _decoder.decode(text)
    except (msgspec.DecodeError, RecursionError) as exc:
        return _salvage_id(text), WebSocketMessageError(f"bad message: {_reason(exc)}")
    if isinstance(message, Subscribe):
        for pattern in message.match:
            problem = pattern_problem(pattern)
            if problem:
                return message.id, WebSocketMessageError(f"bad event pattern {pattern[:_MAX_PATTERN]!r}: {problem}")
    elif isinstance(message, (Call, Emit)):
        # A cheap test first: without that many brackets, nothing can be nested that deep.
        if text.count("[") + text.count("{") > max_depth and (
                _deeper_than(message.params, max_depth) or _deeper_than(message.meta, max_depth)):
            return message.id, WebSocketMessageError(f"bad message: values nested deeper than {max_depth} levels")
    return message


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is refused as an event pattern, or None. Wildcards are bounded (one
    ``*`` run per segment, one ``**``): every event of the node is matched against every
    pattern of every socket (in time linear in the name, but a pattern's states multiply
    that work)."""
    if not pattern or len(pattern) > _MAX_PATTERN:
        return f"must be 1 to {_MAX_PATTERN} characters"
    runs = [_STARS.findall(segment) for segment in pattern.split(".")]
    if any(len(r) > 1 for r in runs) or any(len(star) > 2 for r in runs for star in r):
        return "at most one '*' or '**' in a segment"
    if sum(star == "**" for r in runs for star in r) > 1:
        return "at most one '**'"
    return None


def _salvage_id(text: str) -> Id:
    """The ``id`` of a message refused as a whole, if it can be read at all."""
    try:
        value = _any_decoder.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    try:
        return msgspec.convert(value.get("id"), Id)  # type: ignore[arg-type]
    except msgspec.ValidationError:
        return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)[:300]


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists / objects more than ``limit`` levels (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _encode(frame: dict[str, Any]) -> str:
    """A frame as JSON text: values JSON cannot hold are written as their repr; a frame that
    still cannot be written (a lone surrogate) becomes an error frame of the same ``id``."""
    try:
        return _encoder.encode(frame).decode()
    except (TypeError, ValueError, OverflowError):
        pass
    try:
        plain = msgspec.to_builtins(frame, builtin_types=(), str_keys=True, enc_hook=repr)
        return _encoder.encode(plain).decode()
    except (TypeError, ValueError, OverflowError) as exc:
        error = {"name": "NerveError", "message": f"a {frame.get('type')} frame cannot be written as JSON "
                 f"({type(exc).__name__})", "code": 500, "type": "BAD_FRAME", "data": None}
        return _encoder.encode({"id": frame.get("id"), "type": "error", "error": error}).decode()


def _error_body(exc: BaseException, node_id: str) -> dict[str, Any]:
    plain = error_to_wire(exc, node_id)
    return {k: plain.get(k) for k in ("name", "message", "code", "type", "data")}


# --- the endpoint ----------------------------------------------------------------------------


class WebSocketEndpoint:
    """``{prefix}/ws`` of ``gateway``. ``max_message``: bytes of one client message (larger:
    close 1009). ``max_in_flight``: calls one socket may have running (more: 429).
    ``max_depth``: nesting of ``params`` and ``meta``."""

    def __init__(self, gateway: Gateway, *, max_message: int = 1024 * 1024, max_in_flight: int = 64,
                 max_depth: int = 32) -> None:
        if max_message < 2 or max_in_flight < 1 or max_depth < 1:
            raise ValueError("max_message, max_in_flight and max_depth must be positive")
        self.gateway = gateway
        self.max_message = max_message
        self.max_in_flight = max_in_flight
        self.max_depth = max_depth

    async def serve(self, websocket: WebSocket) -> None:
        """Serve one socket until the client leaves or breaks the protocol. On return the
        socket's calls are cancelled and its event listener removed."""
        try:
            origins = self.gateway.cors_origins
            origin = websocket.headers.get("origin")
            if origins and origin is not None and origin not in origins and "*" not in origins:
                # A browser page of another site (cross-site WebSocket hijacking): refused.
                raise NerveError(f"origin {origin[:200]!r} is not allowed", 403, "ORIGIN_NOT_ALLOWED")
            await self.gateway.admit(websocket)
        except NerveError as exc:
            code = exc.code if isinstance(exc.code, int) else 0
            await websocket.accept()
            await websocket.close(4000 + code if 400 <= code <= 499 else CLOSE_POLICY_VIOLATION,
                                  _close_reason(exc.message))
            return
        await websocket.accept()
        await _Session(self, websocket).run()


class _Close:
    """The last item of a socket's outbox: close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class _Session:
    """One socket: a reader (this task), a writer owning the socket's send side, one task per
    call in flight and one pumping the event listener, all in the session's nursery."""

    def __init__(self, endpoint: WebSocketEndpoint, websocket: WebSocket) -> None:
        self.endpoint = endpoint
        self.gateway = endpoint.gateway
        self.broker = endpoint.gateway.broker
        self.websocket = websocket
        self.outbox, self._outgoing = trio.open_memory_channel[str | _Close](_OUTBOX)
        self.nursery: trio.Nursery
        self.in_flight = 0
        self.listener: Any = None
        self.pump: trio.CancelScope | None = None

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._write)
                if not await self._read():  # the client left: nothing more to send
                    nursery.cancel_scope.cancel()
        finally:
            self._unsubscribe()

    async def _write(self) -> None:
        """Send the outbox's frames in order; after a close, end the session."""
        from starlette.websockets import WebSocketDisconnect

        try:
            async for item in self._outgoing:
                if isinstance(item, _Close):
                    await self.websocket.close(item.code, item.reason)
                    break
                await self.websocket.send_text(item)
        except WebSocketDisconnect:
            pass
        self.nursery.cancel_scope.cancel()

    async def _read(self) -> bool:
        """Handle messages until the client leaves (False) or is sent a close (True)."""
        limit = self.endpoint.max_message
        while True:
            received = await self.websocket.receive()
            if received["type"] == "websocket.disconnect":
                return False
            text = received.get("text")
            if text is None:
                await self.outbox.send(_Close(CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted: send JSON text"))
                return True
            if len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit):
                await self.outbox.send(_Close(CLOSE_MESSAGE_TOO_BIG, f"a message is limited to {limit} bytes"))
                return True
            message = parse(text, self.endpoint.max_depth)
            if isinstance(message, tuple):
                await self._send_error(*message)
            elif isinstance(message, Call):
                if self.in_flight >= self.endpoint.max_in_flight:
                    await self._send_error(message.id, QueueIsFullError(
                        f"too many calls in flight on this socket (at most {self.endpoint.max_in_flight})",
                        data={"limit": self.endpoint.max_in_flight}))
                else:
                    self.in_flight += 1
                    self.nursery.start_soon(self._call, message)
            elif isinstance(message, Emit):
                await self._emit(message)
            elif isinstance(message, Subscribe):
                await self._subscribe(message.match)
                await self.outbox.send(_encode({"id": message.id, "type": "ack"}))
            else:
                self._unsubscribe()
                await self.outbox.send(_encode({"id": message.id, "type": "ack"}))

    async def _send_error(self, id: Id, exc: BaseException, meta: dict[str, Any] | None = None) -> None:
        frame = {"id": id, "type": "error", "error": _error_body(exc, self.broker.node_id)}
        if meta is not None:
            frame["meta"] = meta
        await self.outbox.send(_encode(frame))

    async def _call(self, message: Call) -> None:
        meta = dict(message.meta or {})
        try:
            try:
                if not self.gateway.exposed(message.action):
                    raise ServiceNotFoundError(f"Service '{message.action}' is not found.",
                                               data={"action": message.action})
                timeout = message.timeout / 1000 if message.timeout and math.isfinite(message.timeout) else None
                result = await self.broker.call(message.action, message.params, meta=meta,
                                                timeout=timeout or self.gateway.timeout_of(message.action))
                if isinstance(result, PacketStream):
                    with trio.CancelScope(shield=True):
                        await result.close()
                    raise NerveError(f"'{message.action}' answers with a stream, which this socket does not "
                                     f"carry: call it with POST {self.gateway.prefix}/call/{message.action}",
                                     501, "NOT_IMPLEMENTED")
            except Exception as exc:  # any failure is this call's answer, never the socket's end
                if not isinstance(exc, NerveError):
                    log.debug("call %s over a websocket failed: %r", message.action, exc)
                await self._send_error(message.id, exc, meta)
                return
            await self.outbox.send(_encode({"id": message.id, "type": "result", "response": result, "meta": meta}))
        finally:
            self.in_flight -= 1

    async def _emit(self, message: Emit) -> None:
        send = self.broker.broadcast if isinstance(message, Broadcast) else self.broker.emit
        try:
            await send(message.event, message.params, groups=message.groups, meta=dict(message.meta or {}))
        except NerveError as exc:
            await self._send_error(message.id, exc)
            return
        await self.outbox.send(_encode({"id": message.id, "type": "ack"}))

    async def _subscribe(self, patterns: list[str]) -> None:
        self._unsubscribe()
        listener = self.listener = self.gateway.listen(patterns)
        self.pump = await self.nursery.start(self._pump, listener)

    def _unsubscribe(self) -> None:
        """Stop the listener: no event frame is queued after this returns."""
        if self.pump is not None:
            self.pump.cancel()
            self.pump = None
        if self.listener is not None:
            self.gateway.unlisten(self.listener)
            self.listener = None

    async def _pump(self, listener: Any, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            while True:
                item = await listener.get()
                if item is None:  # fell too far behind (or the gateway is stopping)
                    if self.listener is listener:
                        self.pump = None
                        self._unsubscribe()
                    await self.outbox.send(_encode({"type": "overflow"}))
                    return
                await self.outbox.send(_encode({"type": "event", **item}))


def _close_reason(text: str) -> str:
    """A close frame's reason: at most 123 bytes of UTF-8."""
    return text.encode()[:123].decode("utf-8", "ignore")


def routes(gateway: Gateway, **limits: Any) -> list[Any]:
    """The Starlette routes this module adds to ``gateway``: ``{prefix}/ws`` (a WebSocketRoute)."""
    from starlette.routing import WebSocketRoute

    return [WebSocketRoute(f"{gateway.prefix}/ws", WebSocketEndpoint(gateway, **limits).serve)]
