"""The HTTP gateway (``nerve.gateway``): the Moleculer Sidecar's /v1 API over real sockets on
loopback, driven by a real HTTP client (httpx): calls, errors, emit / broadcast, registry,
external services (an HTTP server of the test's own answering the gateway's POSTs), streamed
bodies both ways, live events (SSE), access checks, hostile bodies; and `nerve gateway` as its
own process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

import nerve
from nerve.errors import ValidationError
from nerve.gateway import serve
from nerve.gateway.app import bearer_token

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


class Point(msgspec.Struct):
    x: int
    y: int


class Math(nerve.Service):
    name = "math"

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, Any, str | None]] = []

    @nerve.action
    async def add(self, ctx: nerve.Context) -> int:
        ctx.meta["seen"] = "math"
        return ctx.params["a"] + ctx.params["b"]  # type: ignore[no-any-return]

    @nerve.action
    async def norm(self, ctx: nerve.Context, p: Point) -> int:
        return p.x * p.x + p.y * p.y

    @nerve.action
    async def slow(self, ctx: nerve.Context) -> str:
        await trio.sleep(5)
        return "late"

    @nerve.action
    async def picky(self, ctx: nerve.Context) -> None:
        raise ValidationError("no", data={"field": "q"})

    @nerve.action
    async def upload(self, ctx: nerve.Context) -> dict[str, Any]:
        digest = hashlib.sha256()
        n = 0
        assert ctx.stream is not None
        async for chunk in ctx.stream:
            digest.update(chunk)
            n += len(chunk)
        return {"bytes": n, "sha256": digest.hexdigest(), "meta": ctx.meta, "params": ctx.params}

    @nerve.action
    async def download(self, ctx: nerve.Context) -> nerve.PacketStream:
        size = int(ctx.params.get("size", 1000))
        ctx.meta.update(size=size, filename="data.bin")

        async def chunks() -> AsyncIterator[bytes]:
            left = size
            while left:
                n = min(left, 100_000)
                yield bytes(range(256)) * (n // 256) + bytes(range(n % 256))
                left -= n

        return nerve.PacketStream.from_iterable(chunks())

    @nerve.event("user.*")
    async def on_user(self, ctx: nerve.Context) -> None:
        self.events.append((ctx.event or "", ctx.params, ctx.event_type))


def expected_download(size: int) -> bytes:
    out = bytearray()
    left = size
    while left:
        n = min(left, 100_000)
        out += bytes(range(256)) * (n // 256) + bytes(range(n % 256))
        left -= n
    return bytes(out)


@asynccontextmanager
async def gateway(**options: Any) -> AsyncIterator[tuple[nerve.Broker, Math, httpx.AsyncClient]]:
    math = Math()
    async with nerve.Broker("gw", services=[math]) as broker, serve(broker, "127.0.0.1:0", **options) as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        yield broker, math, client


async def test_call_answers_response_and_merged_meta() -> None:
    async with gateway() as (_, _, http):
        r = await http.post("/v1/call/math.add", json={"params": {"a": 2, "b": 3}, "meta": {"who": "me"}})
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json; charset=utf-8"
        assert r.headers["x-request-id"]
        assert r.json() == {"response": 5, "meta": {"who": "me", "seen": "math"}}
        # params, meta and options may be absent or null
        r = await http.post("/v1/call/$node.health", json={"params": None, "meta": None, "options": None})
        assert r.status_code == 200 and "nerve" in r.json()["response"]
        r = await http.post("/v1/call/$node.health", content=b"", headers={"content-type": "application/json"})
        assert r.status_code == 200


@pytest.mark.parametrize(("path", "body", "status", "name"), [
    ("/v1/call/nobody.here", {}, 404, "ServiceNotFoundError"),
    ("/v1/call/math.norm", {"params": {"x": 1, "y": "two"}}, 422, "ValidationError"),
    ("/v1/call/math.picky", {}, 422, "ValidationError"),
    ("/v1/call/math.slow", {"timeout": 100}, 504, "RequestTimeoutError"),
    ("/v1/call/math.slow", {"options": {"timeout": 100}}, 504, "RequestTimeoutError"),
])
async def test_errors_are_moleculer_bodies_with_their_status(path: str, body: Any, status: int, name: str) -> None:
    async with gateway() as (_, _, http):
        r = await http.post(path, json=body)
        assert r.status_code == status, r.text
        out = r.json()
        assert out["error"]["name"] == name and out["error"]["code"] == status
        assert out["meta"]["$statusCode"] == status


@pytest.mark.parametrize(("content", "ctype", "status"), [
    (b"{bad json", "application/json", 400),
    (b"\xff\xfe\xfd", "application/json", 400),
    (b"[1, 2, 3]", "application/json", 400),
    (b'{"params": {}, "meta": 5}', "application/json", 400),
    (b'{"options": "x"}', "application/json", 400),
    (b'{"timeout": "soon"}', "application/json", 400),
    (b'{"timeout": -5}', "application/json", 400),
    (b'{"retries": 1e9}', "application/json", 400),
    (b"[" * 5000 + b"]" * 5000, "application/json", 400),
    (b'{"params": "' + b"x" * (2 * 1024 * 1024) + b'"}', "application/json", 413),
])
async def test_hostile_bodies_are_refused_and_the_gateway_serves_on(content: bytes, ctype: str, status: int) -> None:
    async with gateway() as (_, _, http):
        r = await http.post("/v1/call/math.add", content=content, headers={"content-type": ctype})
        assert r.status_code == status, r.text
        assert r.json()["code"] == status
        r = await http.post("/v1/call/math.add", json={"params": {"a": 1, "b": 1}})
        assert r.json()["response"] == 2


async def test_unknown_routes_and_methods() -> None:
    async with gateway() as (_, _, http):
        r = await http.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["type"] == "NOT_FOUND"
        r = await http.get("/v1/call/math.add")
        assert r.status_code == 405
        r = await http.post("/elsewhere", json={})
        assert r.status_code == 404


async def test_emit_and_broadcast_reach_handlers() -> None:
    async with gateway() as (_, math, http):
        r = await http.post("/v1/emit/user.created", json={"params": {"id": 1}})
        assert r.status_code == 200 and r.content == b""
        r = await http.post("/v1/broadcast/user.gone", json={"params": {"id": 2}, "groups": ["math"]})
        assert r.status_code == 200
        r = await http.post("/v1/emit/user.x", json={"params": 1, "groups": 5})
        assert r.status_code == 400
        with trio.fail_after(5):
            while len(math.events) < 2:
                await trio.sleep(0.01)
        assert sorted(math.events) == [("user.created", {"id": 1}, "emit"), ("user.gone", {"id": 2}, "broadcast")]


async def test_registry_lists() -> None:
    async with gateway() as (_, _, http):
        nodes = (await http.get("/v1/registry/nodes")).json()
        assert [n["id"] for n in nodes] == ["gw"]
        services = (await http.get("/v1/registry/services")).json()
        assert {s["name"] for s in services} >= {"math", "$node"}
        actions = (await http.get("/v1/registry/actions")).json()
        assert any(a["name"] == "math.add" for a in actions)
        events = (await http.get("/v1/registry/events")).json()
        assert any(e["name"] == "user.*" for e in events)


async def test_access_check_runs_before_anything() -> None:
    async with gateway(auth=bearer_token("s3cret")) as (_, math, http):
        for method, path in [("POST", "/v1/call/math.add"), ("POST", "/v1/emit/user.x"),
                             ("GET", "/v1/registry/nodes"), ("POST", "/v1/registry/services")]:
            r = await http.request(method, path, json={"params": {"a": 1, "b": 1}})
            assert r.status_code == 401, (path, r.text)
            r = await http.request(method, path, json={}, headers={"authorization": "Bearer wrong"})
            assert r.status_code == 401
        r = await http.post("/v1/call/math.add", json={"params": {"a": 1, "b": 1}},
                            headers={"authorization": "Bearer s3cret"})
        assert r.json()["response"] == 2
        assert math.events == []


async def test_only_exposed_actions_are_callable() -> None:
    async with gateway(expose=["math.add"]) as (_, _, http):
        assert (await http.post("/v1/call/math.add", json={"params": {"a": 1, "b": 1}})).status_code == 200
        assert (await http.post("/v1/call/math.norm", json={})).status_code == 404
        assert (await http.post("/v1/call/$node.list", json={})).status_code == 404


async def test_streamed_upload_and_download() -> None:
    size = 5 * 1024 * 1024 + 7
    body = os.urandom(size)

    async def pieces() -> AsyncIterator[bytes]:  # chunked, no length
        for i in range(0, size, 300_000):
            yield body[i:i + 300_000]

    async with gateway() as (_, _, http):
        r = await http.post("/v1/call/math.upload?filename=up.bin&tag=t1", content=pieces(),
                            headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        out = r.json()["response"]
        assert out["bytes"] == size and out["sha256"] == hashlib.sha256(body).hexdigest()
        assert out["params"] == {"filename": "up.bin", "tag": "t1"}
        assert out["meta"]["filename"] == "up.bin" and out["meta"]["contentType"] == "application/octet-stream"
        async with http.stream("POST", "/v1/call/math.download", json={"params": {"size": size}}) as r:
            assert r.status_code == 200
            assert r.headers["content-length"] == str(size)
            assert r.headers["content-disposition"] == "attachment; filename=\"data.bin\"; filename*=UTF-8''data.bin"
            got = b"".join([piece async for piece in r.aiter_bytes()])
        assert got == expected_download(size)


async def test_a_client_that_leaves_mid_download_stops_the_stream() -> None:
    async with gateway() as (broker, _, http):
        async with http.stream("POST", "/v1/call/math.download", json={"params": {"size": 500_000_000}}) as r:
            async for _ in r.aiter_bytes():
                break
        with trio.fail_after(10):
            while broker.statistics().transit.streams_writing or broker.statistics().transit.streams_reading:
                await trio.sleep(0.05)
        assert (await http.post("/v1/call/math.add", json={"params": {"a": 1, "b": 1}})).json()["response"] == 2


async def test_live_events_as_server_sent_events() -> None:
    async with gateway(events_linger=0.2) as (broker, _, http):
        async with http.stream("GET", "/v1/events?match=order.*") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = r.aiter_lines()
            assert (await lines.__anext__()).startswith(":")
            with trio.fail_after(5):
                while not any(s.startswith("$gateway-events") for s in broker.services):
                    await trio.sleep(0.01)
            await broker.emit("other.thing", {"no": 1})
            await broker.emit("order.placed", {"id": 7})
            got: list[str] = []
            with trio.fail_after(5):
                async for line in lines:
                    if line:
                        got.append(line)
                    if len(got) == 2:
                        break
        assert got[0] == "event: order.placed"
        assert json.loads(got[1][len("data: "):]) == {"event": "order.placed", "data": {"id": 7}, "nodeID": "gw"}
        with trio.fail_after(5):  # the subscription goes with the last listener
            while any(s.startswith("$gateway-events") for s in broker.services):
                await trio.sleep(0.05)
        r = await http.get("/v1/events?match=")
        assert r.status_code == 400


# --- external services ------------------------------------------------------------------------


@asynccontextmanager
async def external_http(answer: Any) -> AsyncIterator[tuple[str, list[tuple[str, Any]]]]:
    """An HTTP server of the test's own (hypercorn on loopback) playing the external service:
    ``answer(path, body)`` returns (status, body, content type)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    seen: list[tuple[str, Any]] = []

    async def handle(request: Request) -> Response:
        body = json.loads(await request.body())
        seen.append((request.url.path, body))
        status, payload, ctype = answer(request.url.path, body)
        return Response(payload if isinstance(payload, bytes) else json.dumps(payload), status_code=status,
                        media_type=ctype)

    app = Starlette(routes=[Route("/{path:path}", handle, methods=["POST"])])
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(lambda task_status: hypercorn_serve(
            app, config, shutdown_trigger=done.wait, task_status=task_status))
        try:
            yield urls[0], seen
        finally:
            done.set()


def _answers(path: str, body: Any) -> tuple[int, Any, str]:
    if path == "/greet":
        return 200, {"response": f"hello {body['params'].get('name')}", "meta": {"greeted": True}}, "application/json"
    if path == "/refuse":
        return 403, {"error": {"name": "ForbiddenError", "message": "not you", "code": 403, "type": "NOPE",
                               "data": {"x": 1}}}, "application/json"
    if path == "/broken":
        return 502, b"upstream down", "text/plain"
    return 200, {"response": None}, "application/json"


async def test_an_external_service_is_a_service_of_the_cluster() -> None:
    async with external_http(_answers) as (base, seen), gateway() as (broker, _, http), \
            nerve.Broker("other", transport="tcp://127.0.0.1:0") as _unused:
        schema = {"name": "ext", "version": 2, "settings": {"baseUrl": base},
                  "actions": {"greet": "/greet", "refuse": {"handler": "/refuse"}, "broken": "/broken",
                              "strict": {"handler": "/greet", "params": {"name": "string"}}},
                  "events": {"user.created": "/on-user", "audit.*": {"handler": "/on-audit", "group": "auditors"}}}
        r = await http.post("/v1/registry/services", json=schema)
        assert r.status_code == 200 and r.json() == {"status": "OK"}
        with trio.fail_after(5):
            await broker.wait_for_services("v2.ext")
        meta: dict[str, Any] = {"from": "py"}
        assert await broker.call("v2.ext.greet", {"name": "ann"}, meta=meta) == "hello ann"
        assert meta == {"from": "py", "greeted": True}
        path, body = seen[-1]
        assert path == "/greet" and body["action"] == "v2.ext.greet" and body["params"] == {"name": "ann"}
        assert body["nodeID"] == "gw" and body["meta"] == {"from": "py"} and body["options"] == {}
        with pytest.raises(nerve.errors.ForbiddenError) as refused:
            await broker.call("v2.ext.refuse")
        assert (refused.value.code, refused.value.type, refused.value.data) == (403, "NOPE", {"x": 1})
        with pytest.raises(nerve.errors.NerveError) as broken:
            await broker.call("v2.ext.broken")
        assert broken.value.message == "Something happened" and broken.value.code == 502
        with pytest.raises(ValidationError):
            await broker.call("v2.ext.strict", {"name": 5})
        # through HTTP too, with the error's status
        r = await http.post("/v1/call/v2.ext.refuse", json={})
        assert r.status_code == 403 and r.json()["error"]["type"] == "NOPE"
        # events: an emit carries its group, a broadcast none
        await broker.emit("user.created", {"id": 1})
        await broker.broadcast("audit.login", {"who": "ann"})
        with trio.fail_after(5):
            while len([p for p, _ in seen if p.startswith("/on-")]) < 2:
                await trio.sleep(0.02)
        events = {p: b for p, b in seen if p.startswith("/on-")}
        assert events["/on-user"]["eventType"] == "emit" and events["/on-user"]["eventGroups"] == ["v2.ext"]
        assert events["/on-audit"]["eventType"] == "broadcast" and "eventGroups" not in events["/on-audit"]
        # replace, then delete
        r = await http.post("/v1/registry/services", json={**schema, "actions": {"greet": "/greet"}})
        assert r.status_code == 200
        r = await http.delete("/v1/registry/services/v2.ext")
        assert r.status_code == 200
        r = await http.delete("/v1/registry/services/v2.ext")
        assert r.status_code == 404 and r.json() == {
            "name": "MoleculerError", "message": "Service not found", "code": 404, "type": "NOT_FOUND",
            "data": {"serviceName": "v2.ext"}}


@pytest.mark.parametrize(("schema", "status", "field"), [
    ({}, 422, "name"),
    ({"name": ""}, 422, "name"),
    ({"name": "x", "actions": {"a": 5}}, 400, "INVALID_HANDLER"),
    ({"name": "x", "actions": {"a": {"handler": ["/x"]}}}, 400, "INVALID_HANDLER"),
    ({"name": "x", "actions": []}, 400, None),
    ({"name": "has space"}, 400, None),
    ({"name": "x", "settings": {"baseUrl": 5}}, 400, None),
    ({"name": "x" * 5000}, 400, None),
    ({"name": "math"}, 409, None),
    ([1, 2], 400, None),
])
async def test_bad_service_schemas_are_refused(schema: Any, status: int, field: str | None) -> None:
    async with gateway() as (broker, _, http):
        r = await http.post("/v1/registry/services", json=schema)
        assert r.status_code == status, r.text
        body = r.json()
        if status == 422:
            assert body["data"][0]["field"] == field and "error" not in body
        elif field is not None:
            assert body["type"] == field
        assert set(broker.services) == {"math", "$node"}


# --- the gateway as its own process --------------------------------------------------------


def test_nerve_gateway_as_a_process_serves_the_sidecar_api(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nerve.cli", "gateway", "--http", "127.0.0.1:0", "--node-id", "sidecar",
         "--service", "test_gateway:Math"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parent,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent)))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode() if proc.stderr else ""
        shown = json.loads(line)
        assert shown["nodeID"] == "sidecar"
        with httpx.Client(base_url=shown["http"], timeout=10) as http:
            r = http.post("/v1/call/math.add", json={"params": {"a": 20, "b": 22}})
            assert r.json() == {"response": 42, "meta": {"seen": "math"}}
            assert [n["id"] for n in http.get("/v1/registry/nodes").json()] == ["sidecar"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


# --- REST aliases ---------------------------------------------------------------------------


class Users(nerve.Service):
    name = "users"
    settings = {"rest": "/api/users"}

    @nerve.action(rest="GET /{id}")
    async def get(self, ctx: nerve.Context, p: UserId) -> dict[str, Any]:
        ctx.meta["$responseHeaders"] = {"X-User": str(p.id), "Bad\r\nHeader": "x", "X-Inject": "a\r\nb"}
        return {"id": p.id, "verbose": p.verbose}

    @nerve.action(rest=["POST /", "PUT /{id}"])
    async def save(self, ctx: nerve.Context) -> dict[str, Any]:
        ctx.meta["$statusCode"] = 201
        ctx.meta["$location"] = f"/api/users/{ctx.params.get('id', 'new')}"
        return {"saved": ctx.params}

    @nerve.action(rest="GET /export/all.csv")
    async def export(self, ctx: nerve.Context) -> str:
        ctx.meta["$responseType"] = "text/csv"
        return "id\n1\n"

    @nerve.action(rest=["", 5, "FETCH /x", "GET nope", "GET //x", {"a": 1}])
    async def ignored(self, ctx: nerve.Context) -> None:
        return None


class UserId(msgspec.Struct):
    id: int
    verbose: bool = False


async def test_rest_aliases_publish_actions_as_routes() -> None:
    async with nerve.Broker("gw", services=[Users()]) as broker, serve(broker, "127.0.0.1:0") as gw, \
            httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.get("/api/users/42?verbose=true")
        assert r.status_code == 200, r.text
        assert r.json() == {"id": 42, "verbose": True}
        assert r.headers["x-user"] == "42" and "x-inject" not in r.headers
        r = await http.get("/api/users/abc")
        assert r.status_code == 422 and r.json()["data"]["field"] == "id"
        r = await http.post("/api/users", json={"name": "ann"})
        assert r.status_code == 201 and r.headers["location"] == "/api/users/new"
        assert r.json() == {"saved": {"name": "ann"}}
        r = await http.put("/api/users/7?x=1", json={"name": "bob"})
        assert r.json() == {"saved": {"x": "1", "name": "bob", "id": "7"}}
        r = await http.get("/api/users/export/all.csv")  # the literal path wins over /{id}
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv") and r.text == "id\n1\n"
        assert (await http.delete("/api/users/7")).status_code == 404
        assert (await http.post("/api/users", content=b"[1]", headers={"content-type": "application/json"})).status_code == 400
        assert (await http.get("/v1/call/users.get")).status_code == 405
        aliases = {(a.method, a.path) for a in gw.gateway.aliases()}
        assert aliases == {("GET", "/api/users/{id}"), ("POST", "/api/users"), ("PUT", "/api/users/{id}"),
                           ("GET", "/api/users/export/all.csv")}


async def test_aliases_of_another_nodes_actions() -> None:
    async with nerve.Broker("svc", transport="tcp://127.0.0.1:0", services=[Users()]) as svc, \
            nerve.Broker("gw", transport="tcp://127.0.0.1:0", peers=[svc.address]) as broker, \
            serve(broker, "127.0.0.1:0") as gw, httpx.AsyncClient(base_url=gw.url) as http:
        with trio.fail_after(10):
            await broker.wait_for_services("users")
        r = await http.get("/api/users/5")
        assert r.json() == {"id": 5, "verbose": False} and r.headers["x-user"] == "5"


async def test_metrics_on_the_gateways_port() -> None:
    async with nerve.Broker("gw", services=[Math()], metrics=True) as broker, serve(broker, "127.0.0.1:0") as gw, \
            httpx.AsyncClient(base_url=gw.url) as http:
        await http.post("/v1/call/math.add", json={"params": {"a": 1, "b": 2}})
        r = await http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert 'moleculer_request_total{action="math.add",service="math",type="local"} 1.0' in r.text
    async with gateway() as (_, _, http):  # without metrics there is no such route
        assert (await http.get("/metrics")).status_code == 404


async def test_per_route_timeouts() -> None:
    async with gateway(timeout={"math.slow": 0.1, "**": 30}) as (_, _, http):
        r = await http.post("/v1/call/math.slow", json={})
        assert r.status_code == 504
        assert (await http.post("/v1/call/math.add", json={"params": {"a": 1, "b": 1}})).status_code == 200
    with pytest.raises(ValueError):
        nerve.gateway.Gateway(nerve.Broker("x"), timeout={"a": -1})


async def test_a_handlers_own_exception_is_a_500_body() -> None:
    class Buggy(nerve.Service):
        name = "buggy"

        @nerve.action(rest="GET /buggy")
        async def oops(self, ctx: nerve.Context) -> None:
            raise TypeError("a bug")

    async with nerve.Broker("gw", services=[Buggy()]) as broker, serve(broker, "127.0.0.1:0") as gw, \
            httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/call/buggy.oops", json={})
        assert r.status_code == 500 and r.json()["error"]["message"] == "a bug"
        r = await http.get("/buggy")
        assert r.status_code == 500 and r.json()["message"] == "a bug"


async def test_bearer_token_in_the_query_for_clients_without_headers() -> None:
    async with gateway(auth=bearer_token("s3cret")) as (_, _, http):
        assert (await http.get("/v1/registry/nodes?access_token=s3cret")).status_code == 200
        assert (await http.get("/v1/registry/nodes?access_token=nope")).status_code == 401
        assert (await http.get("/v1/registry/nodes?access_token=%FF")).status_code == 401


# --- from the review: hostile clients and peers -------------------------------------------------


async def test_a_broken_websocket_upgrade_ends_its_connection_not_the_node() -> None:
    async with gateway() as (broker, _, http):
        host, port = str(http.base_url).split("//")[1].rstrip("/").split(":")
        for tail in (b"x", b"\x00\xff" * 10, b""):
            s = trio.socket.socket()
            await s.connect((host, int(port)))
            await s.send(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" + tail)
            await trio.sleep(0.3)
            s.close()
        assert (await http.post("/v1/call/math.add", json={"params": {"a": 1, "b": 1}})).json()["response"] == 2


class Pipe(nerve.Service):
    name = "pipe"

    @nerve.action
    async def echo(self, ctx: nerve.Context) -> nerve.PacketStream:
        assert ctx.stream is not None
        source = ctx.stream

        async def back() -> AsyncIterator[bytes]:
            async for chunk in source:
                yield chunk

        return nerve.PacketStream.from_iterable(back())

    @nerve.action
    async def broken(self, ctx: nerve.Context) -> nerve.PacketStream:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"x" * 100_000
            raise RuntimeError("disk gone")

        return nerve.PacketStream.from_iterable(chunks())

    @nerve.action
    async def named(self, ctx: nerve.Context) -> nerve.PacketStream:
        ctx.meta.update(filename='résumé "final"\r\n.pdf', **{"$responseType": "text/plain\r\nX-Evil: 1"})

        async def chunks() -> AsyncIterator[bytes]:
            yield b"ok"

        return nerve.PacketStream.from_iterable(chunks())


@pytest.mark.parametrize("size", [16 * 1024, 3 * 1024 * 1024 + 1])
async def test_an_upload_piped_into_a_streamed_answer_loses_nothing(size: int) -> None:
    data = os.urandom(size)

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, size, 65536):
            yield data[i:i + 65536]

    async with nerve.Broker("gw", services=[Pipe()]) as broker, serve(broker, "127.0.0.1:0") as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=20) as http:
        with trio.fail_after(20):
            r = await http.post("/v1/call/pipe.echo", content=pieces(), headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200 and r.content == data


async def test_a_download_failing_midway_is_cut_not_ended_cleanly() -> None:
    async with nerve.Broker("gw", services=[Pipe()]) as broker, serve(broker, "127.0.0.1:0") as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=20) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream("POST", "/v1/call/pipe.broken", json={}) as r:
                assert r.status_code == 200
                async for _ in r.aiter_bytes():
                    pass
        r = await http.post("/v1/call/pipe.named", json={})
        assert r.status_code == 200 and r.content == b"ok"
        assert r.headers["content-type"] == "application/octet-stream" and "x-evil" not in r.headers
        assert r.headers["content-disposition"].startswith('attachment; filename="r_sum_ _final___.pdf"')
        assert "filename*=UTF-8''r%C3%A9sum%C3%A9" in r.headers["content-disposition"]


async def test_system_names_and_schema_budgets_for_external_services() -> None:
    async with gateway(max_external=2) as (broker, _, http):
        r = await http.post("/v1/registry/services", json={"name": "$gateway-events-1"})
        assert r.status_code == 400
        for i in range(2):
            assert (await http.post("/v1/registry/services", json={"name": f"s{i}"})).status_code == 200
        r = await http.post("/v1/registry/services", json={"name": "s2"})
        assert r.status_code == 429
        assert (await http.post("/v1/registry/services", json={"name": "s1", "actions": {"a": "/a"}})).status_code == 200
        r = await http.post("/v1/registry/services", json={"name": "s0", "actions": {f"a{i}": "/a" for i in range(600)}})
        assert r.status_code == 400
        assert {"s0", "s1"} <= set(broker.services)


async def test_a_peers_alias_cannot_block_the_node_or_claim_gateway_routes() -> None:
    class Sneaky(nerve.Service):
        name = "sneaky"

        @nerve.action(rest=["GET /x/" + "".join(f"{{p{i}}}" for i in range(30)) + "/z",
                            "GET /v1/call/math.add", "POST /v1/events", "GET /openapi.json", "GET /ok/{id}"])
        async def grab(self, ctx: nerve.Context) -> str:
            return "sneaky"

    async with nerve.Broker("gw", services=[Sneaky(), Math()]) as broker, serve(broker, "127.0.0.1:0") as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        with trio.fail_after(5):
            assert (await http.get("/x/" + "a" * 80 + "/z")).status_code == 404
        assert (await http.get("/v1/call/math.add")).status_code == 405
        assert (await http.post("/v1/events")).status_code == 405
        assert (await http.get("/ok/7")).json() == "sneaky"
        assert {a.path for a in gw.gateway.aliases()} == {"/ok/{id}"}


async def test_slow_json_bodies_time_out_and_the_timeout_of_options_counts() -> None:
    async with gateway(body_timeout=0.5) as (_, _, http):
        async def trickle() -> AsyncIterator[bytes]:
            yield b'{"params": '
            await trio.sleep(2)
            yield b"{}}"

        r = await http.post("/v1/call/math.add", content=trickle(), headers={"content-type": "application/json"})
        assert r.status_code == 408
        r = await http.post("/v1/call/math.slow", json={"timeout": None, "options": {"timeout": 100}})
        assert r.status_code == 504


async def test_hostile_definitions_from_a_peers_info_keep_openapi_fast_and_whole() -> None:
    """What a peer's INFO says about its actions reaches /openapi.json and the registry
    routes: a chain of 3,000 $defs (quadratic renaming), params nested 400 deep, keys that are
    not strings. The document is built at once and answers 200; the registry too."""
    chain = {f"D{i}": {"type": "object", "properties": {"n": {"$ref": f"#/$defs/D{i + 1}"}}} for i in range(2999)}
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(400):
        deep = {"x": deep}
    actions = {}
    for j in range(4):
        defs = dict(chain, D2999={"type": "string", "title": f"v{j}"})
        actions[f"evil.c{j}"] = {"name": f"evil.c{j}", "params": {"$ref": "#/$defs/D0", "$defs": defs}}
    actions["evil.deep"] = {"name": "evil.deep", "params": deep}
    actions["evil.keys"] = {"name": "evil.keys", "params": {None: 1, 1: {"type": "string"}}}  # type: ignore[dict-item]
    async with gateway() as (broker, _, http):
        broker.registry.update_node("evil", services=[{"name": "evil", "actions": actions, "events": {}}],
                                    instance_id="x", seq=1)
        with trio.fail_after(10):
            r = await http.get("/openapi.json")
        assert r.status_code == 200
        paths = r.json()["paths"]
        assert {"/v1/call/evil.c0", "/v1/call/evil.deep", "/v1/call/evil.keys"} <= set(paths)
        assert (await http.get("/v1/registry/actions")).status_code == 200


async def test_an_answer_whose_type_an_action_chose_is_sandboxed() -> None:
    class Html(nerve.Service):
        name = "html"

        @nerve.action(rest="GET /page")
        async def page(self, ctx: nerve.Context) -> str:
            ctx.meta["$responseType"] = "text/html"
            return "<script>document.title='x'</script>"

    async with nerve.Broker("gw", services=[Html()]) as broker, serve(broker, "127.0.0.1:0") as gw, \
            httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.get("/page")
        assert r.headers["content-type"].startswith("text/html")
        assert r.headers["content-security-policy"] == "sandbox" and r.headers["x-content-type-options"] == "nosniff"


async def test_streamed_bodies_at_once_are_bounded() -> None:
    gate = trio.Event()

    class Slow(nerve.Service):
        name = "slowup"

        @nerve.action
        async def take(self, ctx: nerve.Context) -> int:
            await gate.wait()
            assert ctx.stream is not None
            return len(await ctx.stream.read_all())

    async with nerve.Broker("gw", services=[Slow()]) as broker, \
            serve(broker, "127.0.0.1:0", max_uploads=1, body_timeout=0.5) as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=20) as http:
        results: list[int] = []

        async def first() -> None:
            r = await http.post("/v1/call/slowup.take", content=b"x" * 1000,
                                headers={"content-type": "application/octet-stream"})
            results.append(r.json()["response"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.sleep(0.2)
            r = await http.post("/v1/call/slowup.take", content=b"y" * 10,
                                headers={"content-type": "application/octet-stream"})
            assert r.status_code == 503 and r.json()["type"] == "BUSY"
            gate.set()
        assert results == [1000]


async def test_an_upload_answered_with_a_stream_keeps_its_turn_until_that_answer_ends() -> None:
    more = trio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        await more.wait()
        yield b"b" * 1000

    async with nerve.Broker("gw", services=[Pipe()]) as broker, \
            serve(broker, "127.0.0.1:0", max_uploads=1, body_timeout=0.5) as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=20) as http:
        got: list[bytes] = []

        async def first() -> None:
            r = await http.post("/v1/call/pipe.echo", content=slow_body(),
                                headers={"content-type": "application/octet-stream"})
            got.append(r.content)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.sleep(0.3)  # the echo answered (a stream) and reads the body still
            r = await http.post("/v1/call/pipe.echo", content=b"c", headers={"content-type": "application/octet-stream"})
            assert r.status_code == 503
            more.set()
        assert got == [b"a" * 1000 + b"b" * 1000]
        r = await http.post("/v1/call/pipe.echo", content=b"d", headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200 and r.content == b"d"


async def test_an_access_refusal_on_call_is_the_plain_error_body() -> None:
    async with gateway(auth=bearer_token("t")) as (_, _, http):
        r = await http.post("/v1/call/math.add", json={})
        assert r.status_code == 401 and r.json()["code"] == 401 and "error" not in r.json()


async def test_event_names_with_empty_segments_never_reach_the_bus() -> None:
    """An external service listening to 'user.' (or an action 'a..b') in balanced mode would
    subscribe to an invalid NATS subject: the server answers -ERR and the node reconnected
    for ever. Such names are left out of the bus's queue groups; the node stays on NATS."""
    from nats_server import ensure_nats

    url = ensure_nats()
    ns = f"es{os.getpid()}"
    async with nerve.Broker("gw", transport=url, namespace=ns, disable_balancer=True, services=[Math()]) as broker, \
            serve(broker, "127.0.0.1:0") as gw, httpx.AsyncClient(base_url=gw.url) as http, \
            nerve.Broker("peer", transport=url, namespace=ns) as peer:
        r = await http.post("/v1/registry/services", json={"name": "x", "events": {"user.": "/hook", "a..b": "/h"}})
        assert r.status_code == 200
        with trio.fail_after(10):
            await peer.wait_for_services("math")
            assert (await peer.call("$node.health", node_id="gw"))["nerve"]["node_id"] == "gw"
        await trio.sleep(0.5)
        with trio.fail_after(10):
            assert (await peer.call("$node.health", node_id="gw"))["nerve"]["node_id"] == "gw"
