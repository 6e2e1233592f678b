"""A node's HTTP face: the Moleculer Sidecar's REST API (``/v1``), external services over
HTTP, streams as HTTP bodies, live events as Server-Sent Events.

An ASGI application (Starlette) served by hypercorn's trio worker on the broker's own trio
run, so handlers, calls and streams are the broker's. Two ways to run it:

* standalone, a sidecar node joining a cluster: ``nerve gateway --http 127.0.0.1:5103
  --transport nats://...``;
* hybrid, beside services in one process: ``nerve run --service app:Users --http ...``, or from
  Python::

      async with nerve.Broker(...) as broker, nerve.gateway.serve(broker, "127.0.0.1:5103") as gw:
          print(gw.url)

Routes (the Sidecar's README): ``POST /v1/call/{action}`` (``{params, meta, options}`` ->
``{response, meta}``), ``POST /v1/emit/{event}``, ``POST /v1/broadcast/{event}``,
``GET /v1/registry/nodes|services|actions|events``, ``POST /v1/registry/services`` (an
external service) and ``DELETE /v1/registry/services/{name}``; plus ``GET /v1/events?match=``
(Server-Sent Events). A call with a body that is not JSON (a ``Content-Type`` other than
``application/json``, ``text/json`` or ``*+json``) streams that body as the call's request stream, its params taken from
the query string; a call answered with a stream is a chunked response written as fast as the
client reads. Errors are Moleculer error bodies with the HTTP status of their code.

Needs the ``gateway`` extra (hypercorn, Starlette, httpx).
"""

from nerve.gateway.app import Gateway, GatewayServer, bearer_token, serve

__all__ = ["Gateway", "GatewayServer", "bearer_token", "serve"]
