"""The Sidecar's use case end to end: a nerve gateway on NATS beside a real moleculer.js 0.15
node. An HTTP client registers an external service through the gateway; the moleculer.js node
calls its action (answered by the test's own HTTP server) and sends it events; events emitted
through the gateway reach the moleculer.js node's handlers."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

import nerve
from nerve.gateway import serve

from moleculer_js import moleculer_node, unique_namespace
from nats_server import ensure_nats
from test_gateway import external_http

pytestmark = pytest.mark.anyio


def _answers(path: str, body: Any) -> tuple[int, Any, str]:
    if path == "/greet":
        return 200, {"response": f"hello {body['params']['name']} from {body['nodeID']}",
                     "meta": {"greeter": "http"}}, "application/json"
    return 200, {}, "application/json"


async def test_a_moleculer_js_node_calls_an_external_http_service_and_gets_gateway_events() -> None:
    nats = ensure_nats()
    ns = unique_namespace()
    with moleculer_node("0.15", "json", node_id="js-node", namespace=ns, nats_url=nats):
        async with external_http(_answers) as (base, seen), \
                nerve.Broker("sidecar", transport=nats, namespace=ns, serializer="json") as broker, \
                serve(broker, "127.0.0.1:0") as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            with trio.fail_after(20):
                await broker.wait_for_services("jsmath")
            r = await http.post("/v1/registry/services", json={
                "name": "ext", "settings": {"baseUrl": base},
                "actions": {"greet": "/greet"}, "events": {"js.ping": "/on-ping"}})
            assert r.status_code == 200, r.text
            # moleculer.js sees the external service and calls it (HTTP -> gateway -> NATS ->
            # moleculer.js -> NATS -> gateway -> the external HTTP service, and back)
            r = await http.post("/v1/call/jsmath.waitFor", json={"params": {"services": ["ext"]}})
            assert r.json()["response"] is True, r.text
            r = await http.post("/v1/call/jsmath.callAction", json={
                "params": {"action": "ext.greet", "params": {"name": "ann"}, "meta": {"m": 1}}})
            assert r.status_code == 200, r.text
            out = r.json()["response"]
            assert out["response"] == "hello ann from js-node"
            assert out["meta"] == {"m": 1, "greeter": "http"}
            path, body = next((p, b) for p, b in seen if p == "/greet")
            assert body["action"] == "ext.greet" and body["nodeID"] == "js-node" and body["meta"] == {"m": 1}
            # moleculer.js emits an event the external service listens to
            r = await http.post("/v1/call/jsmath.emitEvent", json={"params": {"event": "js.ping", "payload": {"n": 3}}})
            assert r.status_code == 200
            with trio.fail_after(10):
                while not any(p == "/on-ping" for p, _ in seen):
                    await trio.sleep(0.05)
            ping = next(b for p, b in seen if p == "/on-ping")
            assert ping["params"] == {"n": 3} and ping["eventType"] == "emit" and ping["nodeID"] == "js-node"
            # events emitted through the gateway reach moleculer.js's handlers
            r = await http.post("/v1/emit/py.hello", json={"params": {"from": "http"}})
            assert r.status_code == 200
            with trio.fail_after(10):
                while not (await http.post("/v1/call/jsmath.events", json={})).json()["response"]:
                    await trio.sleep(0.05)
            assert (await http.post("/v1/call/jsmath.events", json={})).json()["response"] == [{"from": "http"}]
            # the registry the gateway shows has both nodes
            nodes = {n["id"] for n in (await http.get("/v1/registry/nodes")).json() if n["available"]}
            assert nodes == {"sidecar", "js-node"}
