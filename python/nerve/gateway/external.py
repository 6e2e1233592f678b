"""External services: a Moleculer service schema whose handlers are URLs (the Moleculer
Sidecar's ``POST /v1/registry/services``), made a real service of the cluster.

The schema: ``name`` (required), ``version``, ``settings.baseUrl``, ``actions`` and ``events``,
each handler a path string or an object with ``handler`` (and, for an action, ``params``
rules, of which the required-field and basic type rules are checked here). When any node calls
an external action, the gateway POSTs ``{action, nodeID, params, meta, options}`` to
``baseUrl + handler`` and answers with the reply's ``response`` (``meta`` merged back), or
with the error it describes; an event is POSTed as ``{event, eventType, eventGroups, nodeID,
params, meta}`` and a failure is logged, never sent back.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import msgspec
import trio

from nerve.context import Context
from nerve.errors import NerveError, ValidationError, error_from_wire, request_timeout
from nerve.service import Service, action, event

__all__ = ["SchemaError", "external_service", "MAX_REPLY", "MAX_HANDLERS"]

log = logging.getLogger("nerve.gateway")

#: the largest reply body an external handler may send (bytes)
MAX_REPLY = 4 * 1024 * 1024
#: actions and events of one external service at most
MAX_HANDLERS = 500
_NAME_LIMIT = 200


class SchemaError(NerveError):
    """A service schema the gateway cannot register (the HTTP answer says what is wrong)."""

    wire_name = "SchemaError"
    default_code = 400
    default_type = "INVALID_SCHEMA"


def _handler_path(where: str, spec: Any) -> tuple[str, dict[str, Any]]:
    """(path, options) of an action or event entry: a string, or ``{handler: str, ...}``."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and isinstance(spec.get("handler"), str):
        return spec["handler"], {k: v for k, v in spec.items() if k != "handler"}
    raise SchemaError(f"{where}: the handler must be a string (a path under settings.baseUrl) or an "
                      "object with a string 'handler'", type="INVALID_HANDLER", data={"where": where})


def _check_name(what: str, name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > _NAME_LIMIT or any(c in name for c in " \t\r\n"):
        raise SchemaError(f"{what} must be a non-empty name without spaces (at most {_NAME_LIMIT} characters)",
                          data={"name": str(name)[:_NAME_LIMIT]})
    return name


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "number": (int, float), "boolean": (bool,), "object": (dict,), "array": (list,),
    "any": (object,), "email": (str,), "url": (str,), "uuid": (str,), "date": (str, int, float),
}


def _rules(params: Any) -> dict[str, tuple[str, bool]]:
    """``{field: (type, optional)}`` from fastest-validator shorthand rules (``"string"``,
    ``"string|optional"``, ``{type: "number", optional: true}``); unknown types check nothing."""
    out: dict[str, tuple[str, bool]] = {}
    if not isinstance(params, dict):
        return out
    for name, rule in params.items():
        if name.startswith("$$"):
            continue
        if isinstance(rule, str):
            parts = rule.split("|")
            kind = parts[0].strip()
            optional = "optional" in parts or "optional:true" in parts or kind.endswith("?")
            out[name] = (kind.rstrip("?"), optional)
        elif isinstance(rule, dict):
            out[name] = (str(rule.get("type", "any")), bool(rule.get("optional", False)))
    return out


def _validate(action_name: str, rules: dict[str, tuple[str, bool]], params: Any) -> None:
    if not rules:
        return
    if not isinstance(params, dict):
        raise ValidationError(f"Parameters validation error: params of '{action_name}' must be an object",
                              data=[{"type": "object", "actual": params, "action": action_name}])
    problems: list[dict[str, Any]] = []
    for name, (kind, optional) in rules.items():
        value = params.get(name)
        if value is None:
            if not optional:
                problems.append({"type": "required", "field": name, "action": action_name,
                                 "message": f"The '{name}' field is required."})
            continue
        types = _TYPES.get(kind)
        if types is not None and not isinstance(value, types) or (kind == "number" and isinstance(value, bool)):
            problems.append({"type": kind, "field": name, "actual": value, "action": action_name,
                             "message": f"The '{name}' field must be a(n) {kind}."})
    if problems:
        raise ValidationError("Parameters validation error!", data=problems)


class _Poster:
    """POSTs to an external service's handlers with one shared HTTP client (httpx on trio)."""

    def __init__(self, client: Any, base_url: str, timeout: float | None) -> None:
        self.client = client
        self.base_url = base_url
        self.timeout = timeout

    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return self.base_url.rstrip("/") + "/" + path.lstrip("/") if self.base_url else path

    async def post(self, path: str, body: dict[str, Any], timeout: float | None) -> tuple[int, str, Any]:
        """(status, reason, parsed JSON reply or None)."""
        content = msgspec.json.encode(body)
        limit = timeout if timeout is not None else self.timeout
        # httpx's timeout bounds each read; the whole exchange is bounded here.
        with trio.fail_after(limit if limit is not None else math.inf):
            return await self._post(path, content, limit)

    async def _post(self, path: str, content: bytes, limit: float | None) -> tuple[int, str, Any]:
        async with self.client.stream("POST", self.url(path), content=content,
                                      headers={"content-type": "application/json"},
                                      timeout=limit) as reply:
            data = bytearray()
            async for piece in reply.aiter_bytes():
                data += piece
                if len(data) > MAX_REPLY:
                    raise NerveError(f"the external handler's reply is larger than {MAX_REPLY} bytes",
                                         502, "REPLY_TOO_LARGE")
            parsed = None
            if reply.headers.get("content-type", "").startswith("application/json") and data:
                try:
                    parsed = msgspec.json.decode(bytes(data))
                except msgspec.DecodeError:
                    parsed = None
            return reply.status_code, reply.reason_phrase or "", parsed


def external_service(schema: Any, client: Any, *, timeout: float | None = None) -> Service:
    """A :class:`~nerve.Service` whose actions and event handlers POST to the URLs of
    ``schema`` (a Moleculer service schema, as the Sidecar takes it)."""
    if not isinstance(schema, dict):
        raise SchemaError("a service schema is a JSON object")
    name = schema.get("name")
    if name is None or name == "":
        raise ValidationError("The 'name' field is required.", data=[{
            "type": "required", "field": "name", "action": "$sidecar.registerService",
            "message": "The 'name' field is required."}])
    _check_name("the service's 'name'", name)
    if name.startswith("$"):
        raise SchemaError("a service name starting with '$' is the system's ($node, $gateway...)",
                          data={"name": name[:_NAME_LIMIT]})
    version = schema.get("version")
    if version is not None and not isinstance(version, (int, str)) or isinstance(version, bool):
        raise SchemaError("'version' must be a number or a string")
    settings = schema.get("settings")
    settings = {} if settings is None else settings
    if not isinstance(settings, dict):
        raise SchemaError("'settings' must be an object")
    base_url = settings.get("baseUrl") or ""
    if not isinstance(base_url, str):
        raise SchemaError("'settings.baseUrl' must be a string")
    poster = _Poster(client, base_url, timeout)
    attrs: dict[str, Any] = {"name": name, "version": version,
                             "settings": {k: v for k, v in settings.items() if isinstance(k, str)},
                             "metadata": {"$external": True}}
    actions = schema.get("actions")
    events = schema.get("events")
    actions = {} if actions is None else actions
    events = {} if events is None else events
    if not isinstance(actions, dict) or not isinstance(events, dict):
        raise SchemaError("'actions' and 'events' must be objects")
    if len(actions) + len(events) > MAX_HANDLERS:
        raise SchemaError(f"at most {MAX_HANDLERS} actions and events in one service")
    for i, (raw, spec) in enumerate(actions.items()):
        _check_name(f"action {raw!r}", raw)
        path, options = _handler_path(f"action {raw!r}", spec)
        rules = _rules(options.get("params"))
        attrs[f"action_{i}"] = action(name=raw)(_action_handler(poster, path, rules))
    for i, (ename, spec) in enumerate(events.items()):
        _check_name(f"event {ename!r}", ename)
        path, options = _handler_path(f"event {ename!r}", spec)
        group = options.get("group")
        if group is not None and not isinstance(group, str):
            raise SchemaError(f"event {ename!r}: 'group' must be a string")
        attrs[f"event_{i}"] = event(ename, group=group)(_event_handler(poster, path))
    cls = type(f"External_{name}".replace(".", "_").replace("-", "_")[:100], (Service,), attrs)
    return cls()  # type: ignore[no-any-return]


def _action_handler(poster: _Poster, path: str, rules: dict[str, tuple[str, bool]]) -> Any:
    async def handler(self: Service, ctx: Context) -> Any:
        params = ctx.params if ctx.params is not None else {}
        _validate(ctx.action or "", rules, params)
        timeout = ctx.timeout
        options: dict[str, Any] = {"timeout": round(timeout * 1000)} if timeout else {}
        body = {"action": ctx.action, "nodeID": ctx.node_id, "params": params, "meta": ctx.meta,
                "options": options}
        try:
            status, reason, reply = await poster.post(path, body, timeout)
        except NerveError:
            raise
        except trio.TooSlowError:
            raise request_timeout(ctx.action, None) from None
        except Exception as exc:  # httpx's errors: the handler could not be reached
            raise NerveError(f"external handler {poster.url(path)} unreachable: {exc}", 502,
                                 "EXTERNAL_UNREACHABLE") from None
        if 200 <= status < 300:
            if isinstance(reply, dict):
                meta = reply.get("meta")
                if isinstance(meta, dict):
                    ctx.meta.update(meta)
                return reply.get("response")
            return None
        if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
            raise error_from_wire(reply["error"], None)
        raise NerveError("Something happened", status, reason or "ERROR")

    return handler


def _event_handler(poster: _Poster, path: str) -> Any:
    async def handler(self: Service, ctx: Context) -> None:
        body: dict[str, Any] = {"event": ctx.event, "eventType": ctx.event_type or "emit",
                                "nodeID": ctx.node_id, "params": ctx.params, "meta": ctx.meta}
        if ctx.event_type != "broadcast":
            body["eventGroups"] = list(ctx.event_groups or [])
        try:
            status, _, _ = await poster.post(path, body, None)
        except (Exception, trio.TooSlowError) as exc:
            log.warning("event %s to external handler %s failed: %s", ctx.event, poster.url(path), exc)
            return
        if not 200 <= status < 300:
            log.warning("event %s to external handler %s: HTTP %d", ctx.event, poster.url(path), status)

    return handler
