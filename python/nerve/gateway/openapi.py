"""The gateway describing itself: ``GET /openapi.json`` (an OpenAPI 3.1 document of the Sidecar
API and of every action of the cluster that HTTP clients may call, built per request from the
registry) and the gateway's page (``GET /``) served from ``static/``. It adds routes only:
calls and events made from the page go through the Sidecar API's own routes.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any
from urllib.parse import quote, unquote

from nerve.errors import NerveError
from nerve.gateway.app import request_id_of

__all__ = ["routes", "document", "OPENAPI_VERSION"]

OPENAPI_VERSION = "3.1.0"

#: the page's files: URL path -> (file under static/, content type). Nothing else is served
#: from there, so no request names a file.
_PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}
_PREFIX_MARK = "__NERVE_PREFIX__"
_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}


def routes(gateway: Any) -> list[Any]:
    """The Starlette routes this module adds to ``gateway``: ``/openapi.json`` and the page."""
    from starlette.routing import Route

    async def openapi_json(request: Any) -> Any:
        try:
            await gateway.admit(request)
            broker = gateway.broker
            listed = await broker.call("$node.actions", {}, node_id=broker.node_id)
        except NerveError as exc:
            return gateway.responds_error(exc, request_id_of(request))
        actions = [a for a in listed if isinstance(a, dict) and gateway.exposed(str(a.get("name", "")))]
        aliases = [(a.method, a.path, a.action) for a in gateway.aliases()]
        return gateway.responds_json(document(actions, prefix=gateway.prefix, node_id=broker.node_id,
                                              aliases=aliases), 200, request_id_of(request))

    out = [Route("/openapi.json", openapi_json, methods=["GET"])]
    for path, (name, ctype) in _PAGE_FILES.items():
        out.append(Route(path, _page_file(name, ctype, gateway.prefix), methods=["GET"]))
    return out


def _page_file(name: str, ctype: str, prefix: str) -> Callable[[Any], Any]:
    """A route answering with one file of ``static/``, read once (the page learns the API's
    prefix from a ``<meta>`` tag filled in here)."""
    from starlette.responses import Response

    body = (resources.files("nerve.gateway") / "static" / name).read_bytes()
    if name == "index.html":
        body = body.replace(_PREFIX_MARK.encode(), html.escape(prefix, quote=True).encode())

    async def route(request: Any) -> Any:
        return Response(body, media_type=ctype, headers=_PAGE_HEADERS)

    return route


# --- the document ----------------------------------------------------------------------------


def document(actions: Iterable[dict[str, Any]], *, prefix: str = "/v1", node_id: str = "",
             version: str | None = None,
             aliases: Iterable[tuple[str, str, str]] = ()) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a gateway at ``prefix`` whose callable actions are
    ``actions`` (entries of ``$node.actions``: ``{"name", "action": definition, ...}``).

    An action whose definition's ``params`` is a JSON Schema (nerve's typed params) has it as
    the schema of the body's ``params``, its ``$defs`` moved to ``components/schemas``; other
    params (a moleculer.js node's fastest-validator rules) are shown as they are under
    ``x-moleculer-params`` and the body takes any object. ``aliases`` (method, path, action)
    are the REST aliases: one operation each, its path parameters from the template."""
    if version is None:
        import nerve

        version = nerve.__version__
    actions = list(actions)
    schemas = _fixed_schemas()
    paths: dict[str, Any] = {}
    for entry in sorted(actions, key=lambda a: str(a.get("name", ""))):
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            continue
        given = entry.get("action")
        definition: dict[str, Any] = given if isinstance(given, dict) else {}
        paths[f"{prefix}/call/{_path_segment(name)}"] = {"post": _call_operation(name, definition, schemas)}
    definitions = {str(e.get("name")): e.get("action") for e in actions if isinstance(e, dict)}
    for method, path, action in sorted(aliases):
        found = definitions.get(action)
        if not isinstance(found, dict):
            continue
        paths.setdefault(path, {})[method.lower()] = _alias_operation(method, path, action, found, schemas)
    paths.update(_sidecar_paths(prefix))
    where = f" on node {node_id}" if node_id else ""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "nerve gateway",
            "version": version,
            "description": (
                f"The Moleculer Sidecar's HTTP API of a nerve gateway{where}, and one "
                f"`POST {prefix}/call/<action>` per action of the cluster it lets HTTP clients call "
                "(generated from the registry when this document was asked for). An action that "
                "answers with a stream answers with its bytes as they come instead of JSON; a call "
                "whose body is not JSON streams that body to the action, its params taken from the "
                "query string."),
        },
        "paths": paths,
        "components": {"schemas": schemas, "responses": _RESPONSES},
    }


def _path_segment(name: str) -> str:
    """An action name as one path segment: RFC 3986 path characters kept (``$``, ``.``, ``:``
    ...), others percent-encoded, including ``/``, ``{`` and ``}`` (OpenAPI's templates)."""
    if name in (".", ".."):
        return name.replace(".", "%2E")
    return quote(name, safe="!$&'()*+,;=:@")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _call_operation(name: str, definition: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    raw = definition.get("params")
    params = _adopt(name, raw, schemas)
    operation: dict[str, Any] = {
        "operationId": f"call {name}",
        "summary": f"Call {name}",
        "tags": [name.rpartition(".")[0] or name],
    }
    typed = params is not None
    if params is None:
        params = {"type": "object", "description": "the action's params (any object)"}
        if raw is not None:  # as JSON text if a tool could take a "$ref" in it for its own
            operation["x-moleculer-params"] = _json_text(raw) if _has_ref(raw) else raw
    body = {
        "type": "object",
        "properties": {
            "params": params,
            "meta": {"type": "object", "description": "the call's meta (answered back, merged)"},
            "options": _ref("CallOptions"),
            "timeout": {"type": "number", "minimum": 0, "deprecated": True,
                        "description": "as options.timeout (the Sidecar takes it here too)"},
            "retries": {"type": "integer", "minimum": 0, "maximum": 100, "deprecated": True,
                        "description": "as options.retries"},
        },
    }
    if typed:  # the action checks its params: they are what a call needs
        body["required"] = ["params"]
    operation["requestBody"] = {"required": typed, "content": _json(body),
                                "description": "`{params, meta, options}`; no params (or no body) "
                                               "calls with `{}`"}
    operation["responses"] = {
        "200": {"description": "the action's answer", "content": _json(_ref("CallAnswer"))},
        "400": {"description": "the body is not a JSON object {params, meta, options} (or the "
                               "action refused its params with a 400 error)",
                "content": _json({"anyOf": [_ref("Error"), _ref("ErrorAnswer")]})},
        "404": {"$ref": "#/components/responses/ActionNotFound"},
        "413": {"$ref": "#/components/responses/TooLarge"},
        "422": {"$ref": "#/components/responses/InvalidParams"},
        "500": {"$ref": "#/components/responses/CallFailed"},
        "504": {"$ref": "#/components/responses/CallTimeout"},
        "default": {"$ref": "#/components/responses/CallFailed"},
    }
    return operation


def _alias_operation(method: str, path: str, action: str, definition: dict[str, Any],
                     schemas: dict[str, Any]) -> dict[str, Any]:
    """A REST alias: path parameters from its template; a body (for a method that takes one)
    of the action's params; the action's result as the answer."""
    names = re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", path)
    operation: dict[str, Any] = {
        "operationId": f"{method.lower()} {path}",
        "summary": f"{action} as {method} {path}",
        "tags": [action.rpartition(".")[0] or action],
        "parameters": [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                       for n in names],
        "responses": {
            "200": {"description": f"the result of {action}", "content": _json({})},
            "400": {"description": "a body that is not a JSON object", "content": _json(_ref("Error"))},
            "404": {"description": "no such route", "content": _json(_ref("Error"))},
            "422": {"description": "params refused", "content": _json(_ref("Error"))},
            "default": {"description": "the action's error", "content": _json(_ref("Error"))},
        },
    }
    if method in ("POST", "PUT", "PATCH"):
        params = _adopt(action, definition.get("params"), schemas)
        operation["requestBody"] = {"required": False, "content": _json(
            params if params is not None else {"type": "object"})}
    return operation


def _has_ref(value: Any) -> bool:
    """Whether a ``$ref`` key appears anywhere in ``value`` (iteratively: a peer's definition
    may be nested deeper than Python's recursion allows)."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            if "$ref" in item:
                return True
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return False


def _json_text(value: Any) -> str:
    import msgspec

    return msgspec.json.encode(value).decode()


# --- params schemas: JSON Schema from a nerve node, rules from others -------------------------

class _NotJsonSchema(Exception):
    pass


#: JSON Schema (2020-12) and OpenAPI keywords a params schema may use; a schema with any other
#: key (a fastest-validator rule's field name) is taken for something else
_KEYWORDS = frozenset({
    "$ref", "$defs", "$schema", "$comment", "type", "properties", "required", "additionalProperties",
    "items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "enum", "const", "title", "description",
    "default", "examples", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "minLength", "maxLength", "pattern", "minItems", "maxItems", "uniqueItems",
    "minProperties", "maxProperties", "patternProperties", "propertyNames", "dependentRequired",
    "dependentSchemas", "if", "then", "else", "contains", "minContains", "maxContains",
    "unevaluatedProperties", "unevaluatedItems", "discriminator", "deprecated", "readOnly", "writeOnly",
    "contentEncoding", "contentMediaType", "contentSchema", "externalDocs", "example", "xml",
})
_TYPES = frozenset({"null", "boolean", "object", "array", "number", "integer", "string"})
#: keywords whose value maps names to schemas, and keywords whose value is data
_NAMED = frozenset({"properties", "patternProperties", "dependentSchemas"})
_DATA = frozenset({"enum", "const", "default", "examples", "example", "dependentRequired", "required",
                   "externalDocs", "xml"})
_DEFS = "#/$defs/"
#: bounds on the work a document does for one action's definitions and for all of them (the
#: definitions come from peers' INFO): beyond, the action's params are shown as any object
_MAX_DEFS = 200
_MAX_ROUNDS = 4
_MAX_COMPONENTS = 5000
_COMPONENT_NAME = re.compile(r"[^A-Za-z0-9._-]")


def _adopt(action: str, params: Any, schemas: dict[str, Any]) -> dict[str, Any] | None:
    """``params`` as a schema of the document (its ``$defs`` added to ``schemas`` under names
    that clash with no other), or None if it is not a JSON Schema of an object."""
    if not isinstance(params, dict) or not params:
        return None
    defs = params.get("$defs", {})
    if not isinstance(defs, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in defs.items()):
        return None
    top = {k: v for k, v in params.items() if k not in ("$defs", "$schema")}
    if not top:
        return None
    if len(defs) > _MAX_DEFS or len(schemas) > _MAX_COMPONENTS:
        return None  # (a peer's definitions: the document's work stays bounded)
    names = {d: _COMPONENT_NAME.sub("_", d) for d in defs}
    if len(set(names.values())) != len(names):
        return None
    base = _COMPONENT_NAME.sub("_", action)
    for _ in range(_MAX_ROUNDS):  # each round renames one or more clashing definitions
        try:
            moved = {d: _rewrite(s, names) for d, s in defs.items()}
            schema = _rewrite(top, names)
        except (_NotJsonSchema, RecursionError):
            return None
        clashing = [d for d, s in moved.items() if schemas.get(names[d], s) != s]
        if not clashing:
            schemas.update((names[d], s) for d, s in moved.items())
            return schema
        taken = set(names.values())
        for d in clashing:
            new = f"{base}.{_COMPONENT_NAME.sub('_', d)}"
            n = 2
            while new in taken or (new in schemas and schemas[new] != moved[d]):
                new, n = f"{base}.{_COMPONENT_NAME.sub('_', d)}_{n}", n + 1
            names[d] = new
            taken.add(new)
    return None


def _rewrite(schema: Any, names: dict[str, str]) -> Any:
    """A copy of ``schema`` with ``#/$defs/X`` references pointing at ``components/schemas``;
    _NotJsonSchema if it has keys that are not keywords or references it does not define."""
    if isinstance(schema, bool):
        return schema
    if not isinstance(schema, dict):
        raise _NotJsonSchema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if not isinstance(key, str) or (key not in _KEYWORDS and not key.startswith("x-")):
            raise _NotJsonSchema
        if key == "$ref":
            out[key] = _component_ref(value, names)
        elif key == "type":
            kinds = value if isinstance(value, list) else [value]
            if not kinds or not all(isinstance(k, str) and k in _TYPES for k in kinds):
                raise _NotJsonSchema
            out[key] = value
        elif key == "$defs":
            raise _NotJsonSchema  # nested $defs are not msgspec's; their references would break
        elif key == "discriminator":
            if not isinstance(value, dict) or not isinstance(value.get("propertyName"), str):
                raise _NotJsonSchema
            mapping = value.get("mapping")
            out[key] = dict(value)
            if mapping is not None:
                if not isinstance(mapping, dict):
                    raise _NotJsonSchema
                out[key]["mapping"] = {str(k): _component_ref(v, names) for k, v in mapping.items()}
        elif key in _NAMED:
            if not isinstance(value, dict):
                raise _NotJsonSchema
            out[key] = {str(k): _rewrite(v, names) for k, v in value.items()}
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                raise _NotJsonSchema
            out[key] = [_rewrite(v, names) for v in value]
        elif key in _DATA or key.startswith("x-") or key in ("title", "description", "$comment", "format",
                                                              "contentEncoding", "contentMediaType"):
            out[key] = value
        elif key in ("items", "additionalProperties", "not", "if", "then", "else", "contains",
                     "propertyNames", "unevaluatedProperties", "unevaluatedItems", "contentSchema"):
            out[key] = _rewrite(value, names)
        else:  # numbers and flags (minimum, maxItems, uniqueItems, deprecated, ...)
            if isinstance(value, (dict, list)):
                raise _NotJsonSchema
            out[key] = value
    return out


def _component_ref(ref: Any, names: dict[str, str]) -> str:
    if not isinstance(ref, str) or not ref.startswith(_DEFS):
        raise _NotJsonSchema
    name = unquote(ref[len(_DEFS):]).replace("~1", "/").replace("~0", "~")
    if name not in names:
        raise _NotJsonSchema
    return f"#/components/schemas/{names[name]}"


# --- the Sidecar's fixed routes -----------------------------------------------------------------

def _fixed_schemas() -> dict[str, Any]:
    error_fields = {
        "name": {"type": "string"},
        "message": {"type": "string"},
        "code": {"type": "integer"},
        "type": {"type": ["string", "null"]},
        "data": {},
    }
    return {
        "Error": {
            "type": "object", "required": ["name", "message", "code"], "properties": error_fields,
            "description": "a Moleculer error, as the gateway refuses a request before any call",
        },
        "ErrorAnswer": {
            "type": "object", "required": ["error", "meta"],
            "description": "a failed call: its error and the call's meta (`$statusCode` added)",
            "properties": {
                "error": {"type": "object", "required": ["name", "message", "code"], "properties": {
                    **error_fields, "stack": {"type": ["string", "null"]}, "nodeID": {"type": ["string", "null"]}}},
                "meta": {"type": "object"},
            },
        },
        "CallOptions": {
            "type": "object",
            "properties": {
                "timeout": {"type": "number", "minimum": 0,
                            "description": "milliseconds the call may take (0: the gateway's default)"},
                "retries": {"type": "integer", "minimum": 0, "maximum": 100},
            },
        },
        "CallAnswer": {
            "type": "object", "required": ["response", "meta"],
            "properties": {"response": {"description": "the action's answer"},
                           "meta": {"type": "object", "description": "the call's meta as it ended"}},
        },
        "EventBody": {
            "type": "object",
            "properties": {
                "params": {"description": "the event's data"},
                "meta": {"type": "object"},
                "options": {"type": "object", "properties": {"groups": _ref("Groups")}},
                "groups": _ref("Groups"),
            },
        },
        "Groups": {"description": "the groups to reach (default: every group subscribed)",
                   "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "Node": {
            "type": "object", "required": ["id", "available"],
            "properties": {"id": {"type": "string"}, "available": {"type": "boolean"},
                           "local": {"type": "boolean"}, "hostname": {"type": ["string", "null"]},
                           "ipList": {"type": ["array", "null"], "items": {"type": "string"}},
                           "client": {}, "instanceID": {}, "seq": {}, "cpu": {}, "address": {}},
        },
        "ServiceEntry": {
            "type": "object", "required": ["name", "fullName", "nodes"],
            "properties": {"name": {"type": "string"}, "fullName": {"type": "string"}, "version": {},
                           "nodes": {"type": "array", "items": {"type": "string"}}},
        },
        "Endpoint": {
            "type": "object", "required": ["nodeID"],
            "properties": {"nodeID": {"type": "string"}, "local": {"type": "boolean"}},
        },
        "ActionEntry": {
            "type": "object", "required": ["name", "action", "endpoints"],
            "properties": {"name": {"type": "string"},
                           "action": {"type": "object", "description": "its definition as INFO carries it"},
                           "endpoints": {"type": "array", "items": _ref("Endpoint")}},
        },
        "EventEntry": {
            "type": "object", "required": ["name", "group", "endpoints"],
            "properties": {"name": {"type": "string"}, "group": {"type": "string"},
                           "endpoints": {"type": "array", "items": _ref("Endpoint")}},
        },
        "ServiceSchema": {
            "type": "object", "required": ["name"],
            "description": "a Moleculer service schema whose handlers are URLs the gateway POSTs to",
            "properties": {
                "name": _ref("Name"),
                "version": {"type": ["string", "integer"]},
                "settings": {"type": "object", "properties": {"baseUrl": {"type": "string"}}},
                "actions": {"type": "object", "propertyNames": _ref("Name"), "additionalProperties": _ref("Handler")},
                "events": {"type": "object", "propertyNames": _ref("Name"), "additionalProperties": _ref("Handler")},
            },
        },
        "Name": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"^[^ \t\r\n]+$",
                 "description": "a name without spaces"},
        "Handler": {"anyOf": [
            {"type": "string", "description": "a path under settings.baseUrl (or a URL)"},
            {"type": "object", "required": ["handler"],
             "properties": {"handler": {"type": "string"}, "params": {"type": "object"},
                            "group": {"type": "string"}}},
        ]},
        "Status": {"type": "object", "required": ["status"], "properties": {"status": {"const": "OK"}}},
    }


def _answer(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": _json(_ref(schema))}


_RESPONSES: dict[str, Any] = {
    "ActionNotFound": _answer("no such action (or HTTP clients may not call it)", "ErrorAnswer"),
    "InvalidParams": _answer("the action refused its params (a ValidationError)", "ErrorAnswer"),
    "CallFailed": _answer("the call failed: its error, with the error's code as the status", "ErrorAnswer"),
    "CallTimeout": _answer("the call took longer than its timeout", "ErrorAnswer"),
    "TooLarge": _answer("the body is larger than the gateway takes", "Error"),
    "Refused": _answer("refused: a Moleculer error, with its code as the status", "Error"),
}


#: a name in a path: not empty, no line break (the routes' path pattern stops at one), and not
#: a dot segment (clients resolve those away)
_SEGMENT = {"type": "string", "minLength": 1, "pattern": r"^[^\n]+$", "not": {"enum": [".", ".."]}}


def _refused() -> dict[str, Any]:
    return {"$ref": "#/components/responses/Refused"}


def _sidecar_paths(prefix: str) -> dict[str, Any]:
    def registry(what: str, item: str, summary: str, **extra: Any) -> dict[str, Any]:
        return {"get": {
            "operationId": f"registry {what}", "summary": summary, "tags": ["registry"], **extra,
            "responses": {"200": {"description": summary,
                                  "content": _json({"type": "array", "items": _ref(item)})},
                          "default": _refused()},
        }}

    def event(kind: str, summary: str) -> dict[str, Any]:
        return {"post": {
            "operationId": kind, "summary": summary, "tags": ["events"],
            "parameters": [{"name": "event", "in": "path", "required": True, "schema": _SEGMENT,
                            "description": "the event's name"}],
            "requestBody": {"required": False, "content": _json(_ref("EventBody"))},
            "responses": {"200": {"description": "sent (the body is empty)"},
                          "413": {"$ref": "#/components/responses/TooLarge"},
                          "default": _refused()},
        }}

    return {
        f"{prefix}/emit/{{event}}": event("emit", "Emit an event (one handler per group)"),
        f"{prefix}/broadcast/{{event}}": event("broadcast", "Broadcast an event (every handler)"),
        f"{prefix}/registry/nodes": registry("nodes", "Node", "The cluster's nodes", parameters=[{
            "name": "onlyAvailable", "in": "query", "required": False, "schema": {"type": "boolean"},
            "description": "list only the nodes that are up"}]),
        f"{prefix}/registry/services": {
            **registry("services", "ServiceEntry", "The cluster's services and their nodes"),
            "post": {
                "operationId": "register service", "tags": ["registry"],
                "summary": "Register an external service (its handlers are URLs), or replace it",
                "requestBody": {"required": True, "content": _json(_ref("ServiceSchema"))},
                "responses": {"200": _answer("registered", "Status"),
                              "413": {"$ref": "#/components/responses/TooLarge"},
                              "default": _refused()},
            },
        },
        f"{prefix}/registry/services/{{name}}": {"delete": {
            "operationId": "unregister service", "tags": ["registry"],
            "summary": "Remove an external service registered over HTTP",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": _SEGMENT,
                            "description": "the service's full name"}],
            "responses": {"200": _answer("removed", "Status"), "default": _refused()},
        }},
        f"{prefix}/registry/actions": registry("actions", "ActionEntry", "The cluster's actions and endpoints"),
        f"{prefix}/registry/events": registry("events", "EventEntry", "The cluster's event subscriptions"),
        f"{prefix}/events": {"get": {
            "operationId": "live events", "tags": ["events"],
            "summary": "Live events, as Server-Sent Events",
            "description": ("One SSE event per event of the cluster whose name matches: `event:` its name, "
                            "`data:` `{\"event\", \"data\", \"nodeID\"}`; `: ping` comments keep the "
                            "connection alive; `event: overflow` ends the stream of a client too slow."),
            "parameters": [{"name": "match", "in": "query", "required": False, "style": "form", "explode": True,
                            "schema": {"type": "array", "items": {"type": "string", "minLength": 1,
                                                                  "maxLength": 200}},
                            "description": "event patterns (`*`, `**`); default `**`"}],
            "responses": {"200": {"description": "the events, as they come",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          "default": _refused()},
        }},
    }
