"""The gateway's ASGI application and its server (see the package docstring for the routes).

Theory of operation: every route runs on the broker's trio run (hypercorn's trio worker is
started in the caller's nursery), so a route awaits ``broker.call`` / ``emit`` directly.
Bodies are bounded: a JSON body is read up to ``max_body`` bytes (413 beyond); a streamed
body is pulled from the socket only as the call's request stream takes credit; a streamed
answer is written only as fast as the client reads. Live events reach outside clients through
one event subscription of the gateway's node (``**`` in a group of its own), made while at
least one client listens and fanned out to per-client queues of ``event_queue`` events (a
client that falls that far behind is disconnected, never buffered without bound).
"""

from __future__ import annotations

import logging
import math
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import trio

from nerve.context import Context
from nerve.errors import (
    ForbiddenError,
    NerveError,
    ServiceNotFoundError,
    StreamError,
    ValidationError,
    error_to_wire,
)
from nerve.gateway.external import SchemaError, external_service
from nerve.registry import match_event
from nerve.service import Service, event
from nerve.streams import PacketStream

__all__ = ["Gateway", "GatewayServer", "serve", "bearer_token", "request_id_of"]

log = logging.getLogger("nerve.gateway")

_JSON = "application/json; charset=utf-8"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_FILENAME = re.compile(r'filename\*?=(?:UTF-8\'\')?"?([^";]+)"?', re.IGNORECASE)
_SSE_PING = 15.0


class HttpError(NerveError):
    """An HTTP-level refusal of the gateway's own (bad body, too large, unknown route)."""

    wire_name = "HttpError"
    default_code = 400
    default_type = "BAD_REQUEST"


def bearer_token(*tokens: str) -> Callable[[Any], Awaitable[None]]:
    """An access check for ``Gateway(auth=...)``: the request must carry
    ``Authorization: Bearer <one of tokens>``, or, for the clients that cannot set headers
    (a browser's ``EventSource`` and ``WebSocket``), ``?access_token=<token>`` (401
    otherwise; compared in constant time)."""
    if not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise ValueError("bearer_token needs at least one non-empty token")
    wanted = [t.encode() for t in tokens]

    async def check(request: Any) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            scheme, given = "bearer", request.query_params.get("access_token", "")
        ok = scheme.lower() == "bearer" and any(
            secrets.compare_digest(given.strip().encode("utf-8", "replace"), w) for w in wanted)
        await trio.lowlevel.checkpoint()
        if not ok:
            raise NerveError("Unauthorized: a valid bearer token is required", 401, "UNAUTHORIZED")

    return check


def _status(exc: BaseException) -> int:
    code = getattr(exc, "code", 500)
    return code if isinstance(code, int) and 400 <= code <= 599 else 500


def _dumps(value: Any) -> bytes:
    """JSON of ``value``; what JSON cannot carry (a key that is not a string, a value of no
    JSON type, nesting past 200 levels) becomes text, never an error."""
    try:
        return msgspec.json.encode(value)
    except (TypeError, ValueError, OverflowError, RecursionError):
        return msgspec.json.encode(_plain(value, 0))


def _plain(value: Any, depth: int) -> Any:
    if depth > 200:
        return "..."
    if value is None or isinstance(value, (bool, int, str)):
        return value if not isinstance(value, int) or abs(value) < 1 << 63 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return repr(value)


class Gateway:
    """The ASGI application (``gateway.app``) of a running ``broker``.

    ``prefix``: where the Sidecar API lives (``/v1``). ``max_body``: bytes of a JSON body
    (1 MiB). ``timeout``: seconds a call may take unless its body says, or a dict
    of action patterns to seconds (the first match wins; none: the broker's ``request_timeout``). ``expose``: which actions HTTP clients may call, as event-style
    patterns (``"users.*"``, ``"**"``); default all, as the Sidecar. ``auth``: an async check
    given the Starlette request, run before anything else; it raises a NerveError (401 / 403)
    to refuse (:func:`bearer_token` is one). ``cors_origins``: origins allowed by CORS.
    ``event_queue``: events a live-events client may fall behind before it is disconnected.
    ``external_timeout``: seconds an external service's handler may take (30).
    ``body_timeout``: seconds a JSON body may take to arrive (30; then 408), and
    ``max_bodies``: JSON bodies read at once (64, so at most 64 x ``max_body`` bytes; a
    request waits for a turn up to ``body_timeout``, then 503). ``max_external``: external
    services registered at most (100; their schemas, 4 MiB in all, travel in this node's INFO).
    ``max_uploads``: streamed request bodies at once (32; each holds at most its stream's
    window, so the node holds at most ``max_uploads`` windows for them; a request waits its
    turn up to ``body_timeout``, then 503). ``events_linger``: seconds the gateway's event
    subscription outlives its last live-events client (10: clients that come and go do not
    make the node re-announce its services each time).
    """

    def __init__(self, broker: Any, *, prefix: str = "/v1", max_body: int = 1024 * 1024,
                 timeout: float | dict[str, float] | None = None, expose: Iterable[str] | None = None,
                 auth: Callable[[Any], Awaitable[None]] | None = None,
                 cors_origins: Iterable[str] = (), event_queue: int = 256,
                 external_timeout: float | None = 30.0, body_timeout: float = 30.0,
                 max_bodies: int = 64, max_external: int = 100, max_uploads: int = 32,
                 events_linger: float = 10.0) -> None:
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware
        from starlette.routing import Route

        if not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"prefix must start with '/' and not end with one, got {prefix!r}")
        if max_body < 2:
            raise ValueError("max_body must be at least 2 bytes")
        self.broker = broker
        self.prefix = prefix
        self.max_body = max_body
        if isinstance(timeout, dict):
            if not all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0 for k, v in timeout.items()):
                raise ValueError("timeout= maps action patterns to positive seconds")
            self.timeouts: list[tuple[str, float]] = list(timeout.items())
        elif timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive seconds")
        else:
            self.timeouts = [("**", timeout)] if timeout is not None else []
        self.expose = None if expose is None else [str(p) for p in expose]
        self.auth = auth
        self.event_queue = event_queue
        #: origins CORS allows (the WebSocket endpoint checks ``Origin`` against them)
        self.cors_origins = list(cors_origins)
        self.external_timeout = external_timeout
        #: services registered over HTTP (full name -> service)
        self.external: dict[str, Service] = {}
        #: serving (set by :func:`serve`): external services may be registered
        self.serving = False
        #: one HTTP client per external service (a handler that never answers holds only its own)
        self._clients: dict[str, Any] = {}
        #: the size of each external service's schema (all of them travel in this node's INFO)
        self._schema_sizes: dict[str, int] = {}
        self.body_timeout = body_timeout
        self.max_external = max_external
        self._bodies = trio.Semaphore(max_bodies)
        self._uploads = trio.Semaphore(max_uploads)
        self.events_linger = events_linger
        self._registering = trio.Lock()
        self._listeners: set[_Listener] = set()
        self._events_service: Service | None = None
        #: subscriptions made so far (each has a name of its own: one may still be on its way
        #: out when the next is made)
        self._events_made = 0
        self._tasks: trio.Nursery | None = None
        p = prefix
        routes = [
            Route(f"{p}/call/{{action:path}}", self.call, methods=["POST"]),
            Route(f"{p}/emit/{{event:path}}", self.emit, methods=["POST"]),
            Route(f"{p}/broadcast/{{event:path}}", self.broadcast, methods=["POST"]),
            Route(f"{p}/registry/nodes", self.registry_list("$node.list"), methods=["GET"]),
            Route(f"{p}/registry/services", self.registry_list("$node.services"), methods=["GET"]),
            Route(f"{p}/registry/actions", self.registry_list("$node.actions"), methods=["GET"]),
            Route(f"{p}/registry/events", self.registry_list("$node.events"), methods=["GET"]),
            Route(f"{p}/registry/services", self.register_service, methods=["POST"]),
            Route(f"{p}/registry/services/{{name:path}}", self.unregister_service, methods=["DELETE"]),
            Route(f"{p}/events", self.live_events, methods=["GET"]),
        ]
        from nerve.gateway import openapi, websocket

        routes += websocket.routes(self)
        routes += openapi.routes(self)
        if getattr(broker, "metrics", None) is not None:
            # Prometheus' exposition of this node, on the gateway's port too (the scrape runs
            # on the broker's trio run, as the metrics port's does)
            routes.append(Route("/metrics", self._metrics_route(broker.metrics.asgi_app()), methods=["GET"]))
        # REST aliases last: any other path is looked up among the actions' ``rest`` aliases
        routes.append(Route("/{path:path}", self.alias, methods=list(_METHODS)))
        self._aliases: tuple[Any, list[_Alias]] = (None, [])
        middleware = []
        origins = self.cors_origins
        if origins:
            middleware.append(Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],
                                         allow_headers=["*"], expose_headers=["X-Request-ID"]))
        self.app = Starlette(routes=routes, middleware=middleware,
                             exception_handlers={404: self._not_found, 405: self._not_allowed})

    def timeout_of(self, action: str) -> float | None:
        """Seconds a call of ``action`` may take unless its body says: the first ``timeout``
        pattern that matches it (None: the broker's ``request_timeout``)."""
        for pattern, seconds in self.timeouts:
            if match_event(action, pattern):
                return seconds
        return None

    @asynccontextmanager
    async def _upload_turn(self, feed: _Feed | None) -> AsyncIterator[None]:
        """A turn among the ``max_uploads`` streamed bodies (a call without one needs none),
        held until the call is over, or, when it answers with a stream (which may go on
        reading the body), until that answer ends: ``feed.keep_turn`` hands the turn to it."""
        if feed is None:
            yield
            return
        with trio.move_on_after(self.body_timeout) as waiting:
            await self._uploads.acquire()
        if waiting.cancelled_caught:
            raise HttpError("Too many uploads at once; try again", 503, "BUSY")
        feed.release = self._uploads.release
        try:
            yield
        finally:
            if not feed.keep_turn:
                feed.give_back()

    def _metrics_route(self, app: Any) -> Callable[[Any], Awaitable[Any]]:
        async def route(request: Any) -> Any:
            from starlette.responses import Response

            try:
                await self._check_access(request)
            except NerveError as exc:
                return self._error(exc, request_id_of(request), wrap=False)
            sent: dict[str, Any] = {"status": 500, "headers": [], "body": b""}

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    sent["status"] = message["status"]
                    sent["headers"] = message.get("headers", [])
                elif message["type"] == "http.response.body":
                    sent["body"] += message.get("body", b"")

            scope = dict(request.scope, path="/metrics", root_path="")
            await app(scope, receive, send)
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in sent["headers"]
                       if k.lower() != b"content-length"}
            return Response(sent["body"], status_code=sent["status"], headers=headers)

        return route

    def responds_json(self, body: Any, status: int = 200, request_id: str | None = None) -> Any:
        """A JSON response as the gateway's routes answer (for the modules adding routes)."""
        return self._json(body, status, request_id)

    def responds_error(self, exc: BaseException, request_id: str, *, wrap: bool = False) -> Any:
        """An error response (a Moleculer error body, the status from its code)."""
        return self._error(exc, request_id, wrap=wrap)

    async def admit(self, request: Any) -> None:
        """Run the access check (``auth``) on ``request``: raises to refuse."""
        await self._check_access(request)

    def exposed(self, action: str) -> bool:
        """Whether HTTP clients may call ``action`` (``expose``)."""
        return self._exposed(action)

    def listen(self, patterns: list[str]) -> Any:
        """A live-events listener for ``patterns``: ``await listener.get()`` returns the next
        event as ``{"event", "data", "nodeID"}``, or None once it fell more than
        ``event_queue`` events behind (it gets nothing more); ``unlisten`` it when done."""
        listener = _Listener(patterns, self.event_queue)
        self._listen(listener)
        return listener

    def unlisten(self, listener: Any) -> None:
        """Remove a listener made by :meth:`listen`."""
        self._unlisten(listener)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    # --- responses ------------------------------------------------------------------------

    def _json(self, body: Any, status: int = 200, request_id: str | None = None,
              headers: dict[str, str] | None = None) -> Any:
        from starlette.responses import Response

        out = {"X-Request-ID": request_id or secrets.token_hex(8)}
        if headers:
            out.update(headers)
        return Response(_dumps(body), status_code=status, media_type=_JSON, headers=out)

    def _error(self, exc: BaseException, request_id: str, meta: dict[str, Any] | None = None, *,
               wrap: bool = True) -> Any:
        plain = error_to_wire(exc, self.broker.node_id)
        status = _status(exc)
        fields = {k: plain.get(k) for k in ("name", "message", "code", "type", "data")}
        if wrap:
            fields["stack"] = getattr(exc, "stack", None)  # a remote one; never the gateway's own
            fields["nodeID"] = plain.get("nodeID")
            the_meta = dict(meta or {})
            the_meta["$statusCode"] = status
            return self._json({"error": fields, "meta": the_meta}, status, request_id)
        return self._json(fields, status, request_id)

    async def _not_found(self, request: Any, exc: Any) -> Any:
        return self._error(HttpError(f"Not found: {request.method} {request.url.path}", 404, "NOT_FOUND"),
                           request_id_of(request), wrap=False)

    async def _not_allowed(self, request: Any, exc: Any) -> Any:
        return self._error(HttpError(f"Method not allowed: {request.method} {request.url.path}", 405,
                                     "METHOD_NOT_ALLOWED"), request_id_of(request), wrap=False)

    # --- request bodies ---------------------------------------------------------------------

    async def _read_json(self, request: Any) -> Any:
        """The JSON body (``{}`` when empty), at most ``max_body`` bytes, within
        ``body_timeout``, ``max_bodies`` at once; HttpError otherwise."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise HttpError(f"Request body is larger than {self.max_body} bytes", 413, "PAYLOAD_TOO_LARGE")
        body = bytearray()
        with trio.move_on_after(self.body_timeout) as waiting:
            await self._bodies.acquire()
        if waiting.cancelled_caught:
            raise HttpError("Too many request bodies arriving at once; try again", 503, "BUSY")
        try:
            with trio.move_on_after(self.body_timeout) as reading:
                async for piece in request.stream():
                    body += piece
                    if len(body) > self.max_body:
                        raise HttpError(f"Request body is larger than {self.max_body} bytes", 413,
                                        "PAYLOAD_TOO_LARGE")
            if reading.cancelled_caught:
                raise HttpError(f"Request body did not arrive within {self.body_timeout:g}s", 408,
                                "REQUEST_TIMEOUT")
        finally:
            self._bodies.release()
        if not body.strip():
            return {}
        try:
            return msgspec.json.decode(bytes(body))
        except Exception as exc:  # DecodeError; RecursionError (nested too deep); UnicodeDecodeError
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise HttpError(f"Invalid request body: {why}", 400, "INVALID_REQUEST_BODY") from None

    async def _check_access(self, request: Any) -> None:
        if self.auth is not None:
            await self.auth(request)

    def _exposed(self, action: str) -> bool:
        return self.expose is None or any(match_event(action, p) for p in self.expose)

    # --- routes -----------------------------------------------------------------------------

    async def call(self, request: Any) -> Any:
        """``POST {prefix}/call/{action}``: the call, its answer ``{response, meta}`` (or a
        streamed body), or its error with the error's status."""
        request_id = request_id_of(request)
        action = request.path_params["action"]
        meta: dict[str, Any] = {}
        try:
            await self._check_access(request)
        except NerveError as exc:  # refused before any call: the plain error body
            return self._error(exc, request_id, wrap=False)
        try:
            if not self._exposed(action):
                raise ServiceNotFoundError(f"Service '{action}' is not found.", data={"action": action})
            ctype = request.headers.get("content-type", "")
            stream = None
            feed = None
            if _is_json(ctype) or not _has_body(request):
                body = await self._read_json(request)
                if not isinstance(body, dict):
                    raise HttpError("The body must be a JSON object {params, meta, options}", 400,
                                    "INVALID_REQUEST_BODY")
                params = body.get("params")
                if params is None:
                    params = {}
                given_meta = body.get("meta")
                if given_meta is not None and not isinstance(given_meta, dict):
                    raise HttpError("'meta' must be an object", 400, "INVALID_REQUEST_BODY")
                meta.update(given_meta or {})
                options = body.get("options")
                if options is not None and not isinstance(options, dict):
                    raise HttpError("'options' must be an object", 400, "INVALID_REQUEST_BODY")
                options = options or {}
                timeout = _millis(_first(body.get("timeout"), options.get("timeout")), "timeout")
                retries = _count(_first(body.get("retries"), options.get("retries")), "retries")
            else:
                params = {k: v for k, v in request.query_params.items()}
                meta.update(_stream_meta(request, ctype))
                timeout = _millis(request.query_params.get("timeout"), "timeout")
                retries = None
                feed = _Feed(request)
                stream = PacketStream.from_iterable(feed)
            async with self._upload_turn(feed):
                result = await self.broker.call(action, params, meta=meta,
                                                timeout=timeout or self.timeout_of(action), retries=retries,
                                                stream=stream)
                if feed is not None and isinstance(result, PacketStream):
                    feed.keep_turn = True
        except HttpError as exc:  # refused before any call: moleculer-web's plain error body
            return self._error(exc, request_id, wrap=False)
        except Exception as exc:  # a NerveError, or a local handler's own exception (500)
            return self._error(exc, request_id, meta)
        if isinstance(result, PacketStream):
            return self._stream_response(result, meta, request_id, feed)
        return self._json({"response": result, "meta": meta}, 200, request_id)

    def _stream_response(self, stream: PacketStream, meta: dict[str, Any], request_id: str,
                         body: _Feed | None = None) -> Any:
        headers = {"X-Request-ID": request_id}
        size = meta.get("size")
        if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
            headers["Content-Length"] = str(size)
        name = meta.get("filename")
        if isinstance(name, str) and name:
            headers["Content-Disposition"] = _disposition(name)
        ctype = meta.get("$responseType") or meta.get("contentType")
        if not (isinstance(ctype, str) and _MEDIA_TYPE.fullmatch(ctype)):
            ctype = "application/octet-stream"
        return _StreamResponse(stream, headers, ctype, body)

    async def emit(self, request: Any) -> Any:
        """``POST {prefix}/emit/{event}``: emit ``params`` (to ``groups``); 200, empty body."""
        return await self._event(request, broadcast=False)

    async def broadcast(self, request: Any) -> Any:
        """``POST {prefix}/broadcast/{event}``: broadcast ``params``; 200, empty body."""
        return await self._event(request, broadcast=True)

    async def _event(self, request: Any, *, broadcast: bool) -> Any:
        from starlette.responses import Response

        request_id = request_id_of(request)
        name = request.path_params["event"]
        try:
            await self._check_access(request)
            body = await self._read_json(request)
            if not isinstance(body, dict):
                raise HttpError("The body must be a JSON object {params, meta, options}", 400,
                                "INVALID_REQUEST_BODY")
            meta = body.get("meta") or {}
            options = body.get("options") or {}
            if not isinstance(meta, dict) or not isinstance(options, dict):
                raise HttpError("'meta' and 'options' must be objects", 400, "INVALID_REQUEST_BODY")
            groups = body.get("groups", options.get("groups"))
            if groups is not None and not (isinstance(groups, str) or (
                    isinstance(groups, list) and all(isinstance(g, str) for g in groups))):
                raise HttpError("'groups' must be a string or a list of strings", 400, "INVALID_REQUEST_BODY")
            send = self.broker.broadcast if broadcast else self.broker.emit
            await send(name, body.get("params"), groups=groups, meta=meta)
        except NerveError as exc:
            return self._error(exc, request_id, wrap=False)
        return Response(b"", status_code=200, headers={"X-Request-ID": request_id})

    def registry_list(self, action: str) -> Callable[[Any], Awaitable[Any]]:
        """The route answering ``GET {prefix}/registry/...`` with this node's ``action``
        (``$node.list``, ...), the query string as its params."""
        async def route(request: Any) -> Any:
            request_id = request_id_of(request)
            try:
                await self._check_access(request)
                params = {k: _query_value(v) for k, v in request.query_params.items()}
                result = await self.broker.call(action, params, node_id=self.broker.node_id)
            except Exception as exc:
                return self._error(exc, request_id, wrap=False)
            return self._json(result, 200, request_id)

        return route

    async def register_service(self, request: Any) -> Any:
        """``POST {prefix}/registry/services``: register (or replace) an external service."""
        import httpx

        request_id = request_id_of(request)
        try:
            await self._check_access(request)
            schema = await self._read_json(request)
            if not self.serving:
                raise HttpError("external services need the gateway to be served (nerve.gateway.serve)",
                                503, "NOT_SERVING")
            async with self._registering:  # one registration at a time: replace is two steps
                client = httpx.AsyncClient()
                try:
                    svc = external_service(schema, client, timeout=self.external_timeout)
                    name = svc.full_name
                    if name in self.broker.services and name not in self.external:
                        raise HttpError(f"service {name!r} is a service of this node, not an external one: "
                                        "it is not replaced over HTTP", 409, "CONFLICT")
                    size = len(_dumps(schema))
                    others = sum(v for k, v in self._schema_sizes.items() if k != name)
                    if others + size > _MAX_SCHEMAS:
                        raise HttpError(f"external services' schemas are limited to {_MAX_SCHEMAS} bytes in all "
                                        "(they travel in this node's INFO)", 413, "PAYLOAD_TOO_LARGE")
                    if name not in self.external and len(self.external) >= self.max_external:
                        raise HttpError(f"at most {self.max_external} external services", 429, "TOO_MANY_SERVICES")
                    if name in self.external:
                        await self._drop_external(name)
                    self.broker.add_service(svc)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await client.aclose()
                    raise
                self.external[name] = svc
                self._clients[name] = client
                self._schema_sizes[name] = size
        except Exception as exc:
            return self._error(exc, request_id, wrap=False)
        return self._json({"status": "OK"}, 200, request_id)

    async def _drop_external(self, name: str) -> None:
        self.external.pop(name, None)
        self._schema_sizes.pop(name, None)
        client = self._clients.pop(name, None)
        try:
            if name in self.broker.services:
                await self.broker.remove_service(name)
        finally:
            if client is not None:
                with trio.CancelScope(shield=True):
                    await client.aclose()

    async def close_external(self) -> None:
        """Remove every external service (the gateway stops serving)."""
        for name in list(self.external):
            try:
                await self._drop_external(name)
            except NerveError:
                pass

    async def unregister_service(self, request: Any) -> Any:
        """``DELETE {prefix}/registry/services/{name}``: remove an external service."""
        request_id = request_id_of(request)
        name = request.path_params["name"]
        try:
            await self._check_access(request)
            async with self._registering:
                if name not in self.external:
                    raise NerveError("Service not found", 404, "NOT_FOUND", {"serviceName": name})
                await self._drop_external(name)
        except NerveError as exc:
            return self._error(exc, request_id, wrap=False)
        return self._json({"status": "OK"}, 200, request_id)

    # --- REST aliases ---------------------------------------------------------------------------

    def aliases(self) -> list[_Alias]:
        """The REST aliases of every available node's actions, rebuilt when a node's services
        change (the registry's node ``seq``s and this node's services say when)."""
        broker = self.broker
        nodes = broker.registry.available_nodes()
        key = (tuple((n.id, n.seq, len(n.services)) for n in nodes), tuple(broker.services))
        if key == self._aliases[0]:
            return self._aliases[1]
        table: list[_Alias] = []
        for node in nodes:
            services = broker.describe_services() if node.local else node.services
            for svc in services:
                if not isinstance(svc, dict):
                    continue
                settings = svc.get("settings")
                prefix = settings.get("rest") if isinstance(settings, dict) else None
                actions = svc.get("actions")
                if not isinstance(actions, dict):
                    continue
                for name, definition in actions.items():
                    if isinstance(definition, dict) and "rest" in definition and isinstance(name, str):
                        if self._exposed(name):
                            table.extend(parse_rest(definition["rest"], prefix, name))
        unique: dict[tuple[str, str], _Alias] = {}
        for alias in table:
            if self._reserved(alias.path):
                continue  # a peer's alias never answers for the gateway's own routes
            unique.setdefault((alias.method, alias.path), alias)
        ordered = sorted(unique.values(), key=lambda a: a.rank)
        self._aliases = (key, ordered)
        return ordered

    def _reserved(self, path: str) -> bool:
        clean = "/" + path.strip("/")
        return (clean == self.prefix or clean.startswith(self.prefix + "/") or clean in _RESERVED
                or clean.startswith("/static/"))

    async def alias(self, request: Any) -> Any:
        """Any other path: the action whose REST alias matches it, params from the path, the
        query and a JSON body; its result is the body, shaped by ``$statusCode``,
        ``$responseType``, ``$responseHeaders`` and ``$location`` in its meta."""
        request_id = request_id_of(request)
        path = request.url.path
        for alias in self.aliases():
            path_params = alias.match(request.method, path)
            if path_params is not None:
                break
        else:
            from starlette.routing import Match

            for route in self.app.routes[:-1]:  # a route of ours, with another method: 405
                if route.matches(request.scope)[0] is Match.PARTIAL:
                    return await self._not_allowed(request, None)
            return await self._not_found(request, None)
        meta: dict[str, Any] = {}
        try:
            await self._check_access(request)
            params: dict[str, Any] = dict(request.query_params.items())
            stream = None
            feed = None
            ctype = request.headers.get("content-type", "")
            if _has_body(request) and not _is_json(ctype):
                meta.update(_stream_meta(request, ctype))
                feed = _Feed(request)
                stream = PacketStream.from_iterable(feed)
            elif _has_body(request):
                body = await self._read_json(request)
                if isinstance(body, dict):
                    params.update(body)
                elif body != {}:
                    raise HttpError("An alias's JSON body must be an object", 400, "INVALID_REQUEST_BODY")
            params.update(path_params)
            async with self._upload_turn(feed):
                result = await self.broker.call(alias.action, params, meta=meta,
                                                timeout=self.timeout_of(alias.action), stream=stream)
                if feed is not None and isinstance(result, PacketStream):
                    feed.keep_turn = True
        except Exception as exc:  # a NerveError, or a local handler's own exception (500)
            return self._error(exc, request_id, wrap=False)
        if isinstance(result, PacketStream):
            return self._stream_response(result, meta, request_id, feed)
        status = meta.get("$statusCode")
        headers = _response_headers(meta)
        from starlette.responses import Response

        if request.method == "HEAD":
            return Response(b"", status_code=200, headers={"X-Request-ID": request_id, **headers})
        code = status if isinstance(status, int) and 200 <= status <= 599 else 200
        ctype = meta.get("$responseType")
        if isinstance(ctype, str) and _MEDIA_TYPE.fullmatch(ctype) and isinstance(result, (str, bytes)):
            body = result.encode() if isinstance(result, str) else result
            # A type an action chose (text/html from any peer's action): served sandboxed, so it
            # can never script the gateway's origin (its page, its API with the user's token).
            return Response(body, status_code=code, media_type=ctype,
                            headers={"X-Request-ID": request_id, **headers, **_SANDBOX})
        return self._json(result, code, request_id, headers)

    # --- live events (Server-Sent Events) -----------------------------------------------------

    async def live_events(self, request: Any) -> Any:
        """``GET {prefix}/events?match=PATTERN``: the events matching the patterns (repeat
        ``match``; default ``**``) as Server-Sent Events, with a comment line every 15 s."""
        from starlette.responses import StreamingResponse

        request_id = request_id_of(request)
        try:
            await self._check_access(request)
            patterns = request.query_params.getlist("match") or ["**"]
            if len(patterns) > 32:
                raise HttpError("at most 32 event patterns", 400, "BAD_PATTERN")
            for p in patterns:  # (matching is linear in the name, whatever the pattern)
                if not p or len(p) > 200:
                    raise HttpError(f"bad event pattern {p[:200]!r}: 1 to 200 characters", 400, "BAD_PATTERN")
            listener = _Listener(patterns, self.event_queue)
            self._listen(listener)
        except NerveError as exc:
            return self._error(exc, request_id, wrap=False)
        headers = {"X-Request-ID": request_id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(self._sse(listener), media_type="text/event-stream", headers=headers)

    def _listen(self, listener: _Listener) -> None:
        if self._events_service is None:
            self._events_made += 1
            svc = _events_service(self, self.broker.node_id, self._events_made)
            self.broker.add_service(svc)  # (ServiceSchemaError: nothing changed)
            self._events_service = svc
        self._listeners.add(listener)

    def _unlisten(self, listener: _Listener) -> None:
        self._listeners.discard(listener)
        listener.close()
        if not self._listeners and self._events_service is not None and self._tasks is not None:
            # Kept a while: a client that subscribes and unsubscribes in a loop would make
            # this node announce its services to the cluster at each turn.
            self._tasks.start_soon(self._unsubscribe_later, self._events_service)

    async def _unsubscribe_later(self, svc: Service) -> None:
        await trio.sleep(self.events_linger)
        if self._listeners or self._events_service is not svc:
            return  # listened to again meanwhile
        self._events_service = None
        if svc.full_name in self.broker.services:
            await self._remove_quietly(svc.full_name)

    async def _remove_quietly(self, name: str) -> None:
        try:
            await self.broker.remove_service(name)
        except NerveError:  # gone already (the broker stopped)
            pass

    def deliver(self, ctx: Context) -> None:
        """An event reached the gateway's node: to every listener whose patterns match it."""
        name = ctx.event or ""
        for listener in list(self._listeners):
            if listener.wants(name):
                listener.put(name, ctx.params, ctx.node_id)

    async def _sse(self, listener: _Listener) -> AsyncIterator[bytes]:
        try:
            yield b": nerve gateway live events\n\n"
            while True:
                with trio.move_on_after(_SSE_PING) as idle:
                    item = await listener.get()
                if idle.cancelled_caught:
                    yield b": ping\n\n"
                    continue
                if item is None:  # fell too far behind
                    yield b"event: overflow\ndata: {}\n\n"
                    return
                yield b"event: " + _sse_field(item["event"]) + b"\ndata: " + _dumps(item) + b"\n\n"
        finally:
            self._unlisten(listener)


_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")


_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")
_MAX_SEGMENTS = 32


class _Alias:
    """``METHOD /path/{param}`` published by an action's ``rest`` property (under its
    service's ``settings["rest"]`` prefix). A ``{param}`` is a whole path segment, and paths
    match segment by segment: linear in the path, whatever a peer's INFO says."""

    def __init__(self, method: str, path: str, action: str) -> None:
        self.method = method
        self.path = path
        self.action = action
        segments = path.strip("/").split("/") if path.strip("/") else []
        if len(segments) > _MAX_SEGMENTS:
            raise ValueError("too many segments")
        #: per segment: ("param", name) or ("literal", text)
        self.segments: list[tuple[bool, str]] = []
        for segment in segments:
            param = _PARAM.fullmatch(segment)
            if param is not None:
                self.segments.append((True, param.group(1)))
            elif "{" in segment or "}" in segment or not segment:
                raise ValueError(f"bad segment {segment!r}")
            else:
                self.segments.append((False, segment))
        #: literal paths before templated ones, longer before shorter
        self.rank = (sum(is_param for is_param, _ in self.segments), -len(self.segments))

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if method != self.method and not (method == "HEAD" and self.method == "GET"):
            return None
        parts = path.strip("/").split("/") if path.strip("/") else []
        if len(parts) != len(self.segments):
            return None
        found: dict[str, str] = {}
        for (is_param, text), part in zip(self.segments, parts):
            if is_param:
                if not part:
                    return None
                found[text] = part
            elif part != text:
                return None
        return found


def parse_rest(spec: Any, prefix: Any, action: str) -> list[_Alias]:
    """The aliases of one action: ``rest`` is ``"GET /users/{id}"``, ``"/users"`` (POST), or a
    list of them; ``prefix`` (the service's ``settings["rest"]``) goes in front. Malformed
    entries (a peer's INFO is not trusted) are skipped."""
    out: list[_Alias] = []
    specs = spec if isinstance(spec, list) else [spec]
    base = prefix.rstrip("/") if isinstance(prefix, str) and prefix.startswith("/") else ""
    for item in specs[:16]:
        if not isinstance(item, str) or len(item) > 500:
            continue
        method, _, path = item.strip().partition(" ")
        if not path:
            method, path = "POST", method
        method = method.upper()
        path = path.strip()
        if method not in _METHODS or not path.startswith("/") or "//" in path:
            continue
        full = base + path if path != "/" or not base else base
        try:
            out.append(_Alias(method, full, action))
        except ValueError:
            continue
    return out


class _Listener:
    """One live-events client: its patterns and a bounded queue of encoded events."""

    def __init__(self, patterns: list[str], size: int) -> None:
        self.patterns = patterns
        self.send, self.receive = trio.open_memory_channel[dict[str, Any]](max(1, size))
        self.overflowed = False

    def wants(self, name: str) -> bool:
        return any(match_event(name, p) for p in self.patterns)

    def put(self, name: str, data: Any, sender: str | None) -> None:
        if self.overflowed:
            return
        try:
            self.send.send_nowait({"event": name, "data": data, "nodeID": sender})
        except trio.WouldBlock:
            self.overflowed = True
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def get(self) -> dict[str, Any] | None:
        if self.overflowed and self.receive.statistics().current_buffer_used == 0:
            await trio.lowlevel.checkpoint()
            return None
        try:
            return await self.receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None

    def close(self) -> None:
        self.send.close()
        self.receive.close()


def _events_service(gateway: Gateway, node_id: str, n: int) -> Service:
    """The gateway's subscription to every event, in a group of its own (an emit reaches one
    handler per group: this one, on every gateway node)."""

    async def on_event(self: Service, ctx: Context) -> None:
        gateway.deliver(ctx)
        await trio.lowlevel.checkpoint()

    attrs = {"name": f"$gateway-events-{n}",
             "on_event": event("**", group=f"$gateway.{node_id}"[:200])(on_event)}
    return type("GatewayEvents", (Service,), attrs)()  # type: ignore[no-any-return]


#: on answers whose content an action chose: no sniffing, and a sandbox of their own
_SANDBOX = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}

#: bytes of external services' schemas at most, all together (they travel in INFO)
_MAX_SCHEMAS = 4 * 1024 * 1024

#: the gateway's own paths outside its prefix (the page, OpenAPI, metrics)
_RESERVED = frozenset({"/", "/index.html", "/openapi.json", "/metrics"})

_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}")


def _response_headers(meta: dict[str, Any]) -> dict[str, str]:
    """The headers a handler set in ``meta["$responseHeaders"]`` (moleculer-web's way), with
    names and values that can be headers (no CR / LF); ``$location`` as Location."""
    out: dict[str, str] = {}
    given = meta.get("$responseHeaders")
    if isinstance(given, dict):
        for name, value in list(given.items())[:50]:
            if isinstance(name, str) and _HEADER_NAME.fullmatch(name) and isinstance(value, (str, int, float)):
                text = str(value)
                if _header_value_ok(text):
                    out[name] = text
    location = meta.get("$location")
    if isinstance(location, str) and _header_value_ok(location):
        out["Location"] = location
    return out


def _header_value_ok(text: str) -> bool:
    """A value an HTTP header can carry as it is: Latin-1, no control characters (CR / LF
    would end it), at most 4 KiB."""
    return len(text) <= 4096 and all(31 < ord(c) < 256 and ord(c) != 127 or c == "\t" for c in text)


def _sse_field(name: str) -> bytes:
    return name.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")


class _Feed:
    """A request's body as a stream's source, saying when it has been read to its end (a
    response may only listen for the client's disconnect then: ASGI's ``receive`` gives the
    body's pieces until it is over)."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.done = trio.Event()
        #: the upload turn's release (``Gateway._upload_turn``), called once by ``give_back``
        self.release: Callable[[], None] | None = None
        #: the call answered with a stream: the turn goes back when that answer ends
        self.keep_turn = False

    def give_back(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            release()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self.request.stream():
                if piece:
                    yield piece
        finally:
            self.done.set()


class _Aborted(Exception):
    """A streamed answer failed after its head went out: the connection is dropped, so the
    client sees a cut body (never a clean end of a partial one)."""


class _StreamResponse:
    """A streamed answer (an ASGI app): chunks written as the client takes them; the stream
    stopped when the client goes (watched only once the request's body is read, whose pieces
    ``receive`` would otherwise take); a failure mid-way drops the connection."""

    def __init__(self, stream: PacketStream, headers: dict[str, str], media_type: str,
                 body: _Feed | None) -> None:
        self.stream = stream
        self.headers = headers
        self.media_type = media_type
        self.body = body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        stream = self.stream
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in {**self.headers, **_SANDBOX}.items()]
        raw.append((b"content-type", self.media_type.encode("latin-1")))
        finished = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": raw})
            async with trio.open_nursery() as nursery:
                async def watch() -> None:
                    if self.body is not None:
                        await self.body.done.wait()
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            nursery.cancel_scope.cancel()
                            return

                nursery.start_soon(watch)
                try:
                    async for chunk in stream:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except StreamError as exc:
                    log.warning("a streamed answer failed mid-way: %s", exc)
                    raise _Aborted(str(exc)) from None
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                finished = True
                nursery.cancel_scope.cancel()
        finally:
            if self.body is not None:
                self.body.give_back()  # (an upload's turn, kept while this answer ran)
            if not finished:
                with trio.CancelScope(shield=True):
                    await stream.close()  # the reader stops: the producer is told


#: a media type as a header can carry it (``type/subtype`` and parameters, no CR / LF)
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}(?:;[\x20-\x7e]{0,200})?")


def _disposition(name: str) -> str:
    """``Content-Disposition`` for a download named ``name`` (any text): an ASCII fallback and
    the UTF-8 name (RFC 6266), nothing that could end the header."""
    from urllib.parse import quote

    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name[:255])
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name[:255], safe='')}"


def request_id_of(request: Any) -> str:
    """The request's ``X-Request-ID`` if it sent a sane one (``[A-Za-z0-9._:-]{1,128}``),
    else a new one: what the gateway's answers carry."""
    given = request.headers.get("x-request-id")
    if given and _REQUEST_ID.fullmatch(given):
        return str(given)
    return secrets.token_hex(12)


def _is_json(ctype: str) -> bool:
    main = ctype.split(";", 1)[0].strip().lower()
    return main in ("", "application/json", "text/json") or main.endswith("+json")


def _has_body(request: Any) -> bool:
    length = request.headers.get("content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return "chunked" in request.headers.get("transfer-encoding", "").lower()


def _stream_meta(request: Any, ctype: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"contentType": ctype}
    length = request.headers.get("content-length")
    if length is not None and length.isdigit():
        meta["contentLength"] = int(length)
    name = request.query_params.get("filename")
    if not name:
        found = _FILENAME.search(request.headers.get("content-disposition", ""))
        name = found.group(1) if found else None
    if name:
        meta["filename"] = name[:255]
    return meta


_MAX_MILLIS = 100 * 86400 * 1000


def _first(*values: Any) -> Any:
    """The first value that is not None (the Sidecar reads the top level, its README options)."""
    return next((v for v in values if v is not None), None)


def _millis(value: Any, what: str) -> float | None:
    """A Moleculer timeout in milliseconds as seconds (None / 0: none)."""
    if value is None or value == "":
        return None
    try:
        ms = float(value)
    except (TypeError, ValueError):
        raise HttpError(f"'{what}' must be a number of milliseconds", 400, "INVALID_REQUEST_BODY") from None
    if isinstance(value, bool) or not math.isfinite(ms) or ms < 0:
        raise HttpError(f"'{what}' must be a number of milliseconds", 400, "INVALID_REQUEST_BODY")
    ms = min(ms, _MAX_MILLIS)  # (a budget past 100 days is none: it would not serialize)
    return ms / 1000 if ms else None


def _count(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 2.0 is an integer to JSON Schema (and to JavaScript)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise HttpError(f"'{what}' must be an integer from 0 to 100", 400, "INVALID_REQUEST_BODY")
    return value


def _query_value(value: str) -> Any:
    return {"true": True, "false": False}.get(value, value)


class GatewayServer:
    """A gateway being served: ``url`` (``http://host:port``), ``gateway`` (the app)."""

    def __init__(self, gateway: Gateway, urls: list[str]) -> None:
        self.gateway = gateway
        self.urls = urls
        self.url = urls[0] if urls else ""


def _guard_connections() -> None:
    """One HTTP connection's failure must end that connection, never the node: hypercorn's
    connection handlers run in the nursery of its server, itself in the broker's, and an
    exception of one (h11 refusing a state hypercorn did not expect, say) would end them all.
    Its trio server is given a connection class that contains such failures (once per process)."""
    import hypercorn.trio.run as hypercorn_run
    from hypercorn.trio.tcp_server import TCPServer

    if getattr(hypercorn_run.TCPServer, "nerve_guarded", False):
        return

    class GuardedTCPServer(TCPServer):
        nerve_guarded = True

        async def run(self) -> None:
            try:
                await super().run()
            except Exception as exc:  # (trio.Cancelled is not an Exception: it goes on)
                log.warning("an HTTP connection ended on an error: %r", exc)
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(self.stream)

    hypercorn_run.TCPServer = GuardedTCPServer  # type: ignore[misc]


@asynccontextmanager
async def serve(broker: Any, address: str = "127.0.0.1:5103", **options: Any) -> AsyncIterator[GatewayServer]:
    """Serve a :class:`Gateway` of the running ``broker`` at ``address`` (``HOST:PORT``; port 0
    picks a free one, read ``.url``) until the block ends. ``options`` go to :class:`Gateway`."""
    import httpx
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT (a port from 0 to 65535), got {address!r}")
    gateway = options.pop("gateway", None) or Gateway(broker, **options)
    _guard_connections()
    config = Config()
    config.bind = [address]
    config.accesslog = None
    config.errorlog = logging.getLogger("nerve.gateway.http")  # type: ignore[assignment]
    config.keep_alive_timeout = 30
    config.keep_alive_max_requests = 100_000  # (hypercorn closes a connection after 1000 by default)
    config.websocket_max_message_size = 1024 * 1024 + 4096  # (the WebSocket endpoint's bound)
    config.graceful_timeout = 2
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        gateway.serving = True
        gateway._tasks = nursery
        urls = await nursery.start(lambda task_status: hypercorn_serve(
            gateway, config, shutdown_trigger=done.wait, task_status=task_status))
        try:
            yield GatewayServer(gateway, list(urls))
        finally:
            done.set()
            gateway.serving = False
            for listener in list(gateway._listeners):
                listener.close()
            with trio.CancelScope(shield=True):
                await gateway.close_external()
