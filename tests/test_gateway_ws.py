"""The gateway's WebSocket endpoint (``{prefix}/ws``) driven by a real client (httpx-ws) over
loopback: calls answered by id with merged meta, Moleculer error bodies, concurrency and its
limit, emit / broadcast, live events from another node and their overflow, the access check,
and hostile frames that must never take the node down."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, WebSocketNetworkError, aconnect_ws

import nerve
from nerve.errors import ValidationError
from nerve.gateway import serve
from nerve.gateway.app import bearer_token

pytestmark = pytest.mark.anyio


class Shop(nerve.Service):
    name = "shop"

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, Any, str | None, dict[str, Any]]] = []
        self.gate = trio.Event()

    @nerve.action
    async def add(self, ctx: nerve.Context) -> int:
        ctx.meta["seen"] = "shop"
        return ctx.params["a"] + ctx.params["b"]  # type: ignore[no-any-return]

    @nerve.action
    async def slow(self, ctx: nerve.Context) -> str:
        await trio.sleep(float(ctx.params.get("seconds", 5)))
        return "slow"

    @nerve.action
    async def gated(self, ctx: nerve.Context) -> int:
        await self.gate.wait()
        return ctx.params["n"]  # type: ignore[no-any-return]

    @nerve.action
    async def picky(self, ctx: nerve.Context) -> None:
        raise ValidationError("no", data={"field": "q"})

    @nerve.event("user.*")
    async def on_user(self, ctx: nerve.Context) -> None:
        self.events.append((ctx.event or "", ctx.params, ctx.event_type, dict(ctx.meta)))


Gw = tuple[nerve.Broker, Shop, httpx.AsyncClient, str]


@asynccontextmanager
async def gateway(node_id: str = "ws-gw", **options: Any) -> AsyncIterator[Gw]:
    shop = Shop()
    options.setdefault("events_linger", 0.2)
    async with nerve.Broker(node_id, services=[shop]) as broker, serve(broker, "127.0.0.1:0", **options) as gw, \
            httpx.AsyncClient(timeout=10) as http:
        yield broker, shop, http, gw.url + "/v1/ws"


def connect(url: str, http: httpx.AsyncClient, **options: Any) -> AbstractAsyncContextManager[AsyncWebSocketSession]:
    return aconnect_ws(url, http, session_class=AsyncWebSocketSession, **options)


async def send(ws: AsyncWebSocketSession, message: Any) -> None:
    await ws.send_text(json.dumps(message))


async def receive(ws: AsyncWebSocketSession, timeout: float = 5) -> Any:
    return json.loads(await ws.receive_text(timeout))


async def call(ws: AsyncWebSocketSession, id: Any, action: str, params: Any = None, **more: Any) -> Any:
    await send(ws, {"id": id, "type": "call", "action": action, "params": params, **more})
    return await receive(ws)


def gateway_subscribed(broker: nerve.Broker) -> bool:
    return any(s.startswith("$gateway-events") for s in broker.services)


async def wait_until(predicate: Any, timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


# --- calls ----------------------------------------------------------------------------------


async def test_call_answers_by_id_with_the_callee_meta_merged() -> None:
    async with gateway() as (_, _, http, url), connect(url, http) as ws:
        answer = await call(ws, "c-1", "shop.add", {"a": 2, "b": 3}, meta={"who": "me"})
        assert answer == {"id": "c-1", "type": "result", "response": 5, "meta": {"who": "me", "seen": "shop"}}
        # the socket serves on; params, meta and timeout may be left out; ids are any scalar
        await send(ws, {"id": 7, "type": "call", "action": "$node.health"})
        answer = await receive(ws)
        assert answer["id"] == 7 and answer["type"] == "result" and "nerve" in answer["response"]


@pytest.mark.parametrize(("message", "code", "name"), [
    ({"action": "nobody.here"}, 404, "ServiceNotFoundError"),
    ({"action": "shop.picky"}, 422, "ValidationError"),
    ({"action": "shop.slow", "timeout": 100}, 504, "RequestTimeoutError"),
    ({"action": "$node.health"}, 404, "ServiceNotFoundError"),  # not exposed
])
async def test_call_errors_are_moleculer_error_bodies(message: dict[str, Any], code: int, name: str) -> None:
    async with gateway(expose=["shop.*"]) as (_, _, http, url), connect(url, http) as ws:
        await send(ws, {"id": "e", "type": "call", "meta": {"m": 1}, **message})
        answer = await receive(ws)
        assert answer["id"] == "e" and answer["type"] == "error"
        assert set(answer["error"]) == {"name", "message", "code", "type", "data"}
        assert (answer["error"]["code"], answer["error"]["name"]) == (code, name)
        assert answer["meta"]["m"] == 1
        if name == "ValidationError":
            assert answer["error"]["data"] == {"field": "q"} and answer["error"]["message"] == "no"
        if message["action"] == "nobody.here":
            assert answer["error"]["type"] == "SERVICE_NOT_FOUND"
        # the socket serves on
        assert (await call(ws, 2, "shop.add", {"a": 1, "b": 1}))["response"] == 2


async def test_concurrent_calls_are_answered_as_they_settle() -> None:
    async with gateway() as (_, _, http, url), connect(url, http) as ws:
        with trio.fail_after(3):
            await send(ws, {"id": "slow", "type": "call", "action": "shop.slow", "params": {"seconds": 0.5}})
            await send(ws, {"id": "fast", "type": "call", "action": "shop.add", "params": {"a": 1, "b": 2}})
            first, second = await receive(ws), await receive(ws)
        assert (first["id"], first["response"]) == ("fast", 3)
        assert (second["id"], second["response"]) == ("slow", "slow")


async def test_calls_beyond_the_in_flight_limit_are_refused_not_queued() -> None:
    async with gateway() as (_, shop, http, url), connect(url, http) as ws:
        for n in range(64):
            await send(ws, {"id": n, "type": "call", "action": "shop.gated", "params": {"n": n}})
        refused = await call(ws, "over", "shop.gated", {"n": 64})
        assert refused["id"] == "over" and refused["type"] == "error"
        assert refused["error"]["code"] == 429 and refused["error"]["name"] == "QueueIsFullError"
        assert refused["error"]["data"] == {"limit": 64}
        shop.gate.set()
        answers = [await receive(ws) for _ in range(64)]
        assert sorted(a["response"] for a in answers) == list(range(64))
        assert all(a["type"] == "result" and a["id"] == a["response"] for a in answers)
        # the slots are free again
        assert (await call(ws, "again", "shop.gated", {"n": 1}))["response"] == 1


# --- events -----------------------------------------------------------------------------------


async def test_emit_and_broadcast_reach_event_handlers() -> None:
    async with gateway() as (_, shop, http, url), connect(url, http) as ws:
        await send(ws, {"id": 1, "type": "emit", "event": "user.created", "params": {"id": 3}, "meta": {"by": "ws"}})
        assert await receive(ws) == {"id": 1, "type": "ack"}
        await send(ws, {"id": 2, "type": "broadcast", "event": "user.gone", "params": {"id": 4}})
        assert await receive(ws) == {"id": 2, "type": "ack"}
        await send(ws, {"id": 3, "type": "emit", "event": "user.none", "groups": ["nobody"]})
        assert await receive(ws) == {"id": 3, "type": "ack"}
        await wait_until(lambda: len(shop.events) >= 2)
        await trio.sleep(0.05)
        assert sorted(e[:3] for e in shop.events) == [("user.created", {"id": 3}, "emit"),
                                                     ("user.gone", {"id": 4}, "broadcast")]
        assert next(e[3] for e in shop.events if e[0] == "user.created")["by"] == "ws"


async def test_subscribe_receives_another_nodes_events_until_unsubscribe() -> None:
    async with gateway("ws-gw-sub") as (broker, _, http, url), nerve.Broker("ws-other") as other, \
            connect(url, http) as ws:
        await send(ws, {"id": "s", "type": "subscribe", "match": ["news.*"]})
        assert await receive(ws) == {"id": "s", "type": "ack"}
        await wait_until(lambda: any(ep.node_id == broker.node_id
                                     for ep in other.registry.event_endpoints("news.today")))
        await other.emit("sports.today", {"no": 1})
        await other.emit("news.today", {"headline": "hi"})
        assert await receive(ws) == {"type": "event", "event": "news.today", "data": {"headline": "hi"},
                                     "nodeID": "ws-other"}
        await send(ws, {"id": "u", "type": "unsubscribe"})
        assert await receive(ws) == {"id": "u", "type": "ack"}
        await other.broadcast("news.later", {"headline": "late"})
        await broker.emit("news.local", {})
        await trio.sleep(0.1)
        # the next frame is the call's answer: no event came after the unsubscribe's ack
        assert (await call(ws, "c", "shop.add", {"a": 1, "b": 1}))["response"] == 2
        await wait_until(lambda: not gateway_subscribed(broker))

        # a listener goes with its socket
        async with connect(url, http) as ws2:
            await send(ws2, {"id": 1, "type": "subscribe"})
            assert await receive(ws2) == {"id": 1, "type": "ack"}
            assert gateway_subscribed(broker)
        await wait_until(lambda: not gateway_subscribed(broker))


async def test_a_client_that_falls_behind_gets_overflow_and_no_more_events() -> None:
    async with gateway(event_queue=4) as (broker, _, http, url), \
            connect(url, http, queue_size=1) as ws:
        await send(ws, {"id": 1, "type": "subscribe", "match": ["tick"]})
        assert await receive(ws) == {"id": 1, "type": "ack"}
        # the client reads nothing while ~20 MB of events pile up on the socket
        payload = "x" * 100_000
        for n in range(200):
            await broker.emit("tick", {"n": n, "pad": payload})
        await trio.sleep(0.2)
        frames: list[Any] = []
        with trio.fail_after(10):
            while not frames or frames[-1]["type"] != "overflow":
                frames.append(await receive(ws))
        events = [f["data"]["n"] for f in frames[:-1]]
        assert all(f["type"] == "event" for f in frames[:-1])
        assert events == sorted(events) and 0 < len(events) < 200
        await broker.emit("tick", {"n": "after"})
        assert (await call(ws, "c", "shop.add", {"a": 2, "b": 2}))["response"] == 4
        await wait_until(lambda: not gateway_subscribed(broker))


async def test_bad_patterns_are_refused() -> None:
    async with gateway() as (broker, _, http, url), connect(url, http) as ws:
        for match in (["**" * 10 + "x"], ["a*b*c"], [""], "news.*", [], ["ok"] * 17):
            await send(ws, {"id": "p", "type": "subscribe", "match": match})
            answer = await receive(ws)
            assert answer["type"] == "error" and answer["error"]["code"] == 400, match
        assert not gateway_subscribed(broker)


# --- access -----------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dA=="}])
async def test_refused_clients_are_closed_with_4401(headers: dict[str, str]) -> None:
    async with gateway(auth=bearer_token("t")) as (_, _, http, url):
        async with connect(url, http, headers=headers) as ws:
            with pytest.raises(WebSocketDisconnect) as closed:
                await ws.receive_text(5)
        assert closed.value.code == 4401 and "bearer" in closed.value.reason
        async with connect(url, http, headers={"Authorization": "Bearer t"}) as ws:
            assert (await call(ws, 1, "shop.add", {"a": 1, "b": 2}))["response"] == 3


async def test_pages_of_other_origins_are_refused_when_cors_is_set() -> None:
    async with gateway(cors_origins=["https://app.example"]) as (_, _, http, url):
        async with connect(url, http, headers={"Origin": "https://evil.example"}) as ws:
            with pytest.raises(WebSocketDisconnect) as closed:
                await ws.receive_text(5)
        assert closed.value.code == 4403
        async with connect(url, http, headers={"Origin": "https://app.example"}) as ws:
            assert (await call(ws, 1, "shop.add", {"a": 1, "b": 2}))["response"] == 3
        async with connect(url, http) as ws:  # not a browser: no Origin
            assert (await call(ws, 2, "shop.add", {"a": 2, "b": 2}))["response"] == 4


async def test_access_token_in_the_query_for_browsers() -> None:
    async with gateway(auth=bearer_token("t")) as (_, _, http, url):
        async with connect(url + "?access_token=t", http) as ws:
            assert (await call(ws, 1, "shop.add", {"a": 1, "b": 2}))["response"] == 3


# --- hostile frames ---------------------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def text_frame(payload: bytes) -> bytes:
    """A masked client text frame carrying ``payload`` as is (even if not UTF-8)."""
    assert len(payload) < 126
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


ANSWERED = [
    ("garbage", None),
    ("{not json", None),
    ("[1, 2]", None),
    ('"a string"', None),
    ('{"type": 5}', None),
    ('{"id": "t", "type": "teleport"}', "t"),
    ('{"id": "a", "type": "call"}', "a"),
    ('{"id": "b", "type": "call", "action": 5}', "b"),
    ('{"id": "c", "type": "call", "action": "shop.add", "meta": []}', "c"),
    ('{"id": "d", "type": "call", "action": "shop.add", "timeout": -5}', "d"),
    ('{"id": "e", "type": "emit", "event": "user.x", "groups": [1]}', "e"),
    ('{"id": {"no": 1}, "type": "call", "action": "shop.add"}', None),
    ('{"id": "f", "type": "call", "action": "shop.add", "params": ' + nested(200) + "}", "f"),
    ('{"id": "g", "type": "emit", "event": "user.x", "meta": {"k": ' + nested(40) + "}}", "g"),
    ('{"id": "h", "type": "call", "action": "shop.add", "params": ' + nested(50_000) + "}", None),
    ('{"id": "i", "type": "call", "action": "shop.add", "params": 1e400}', None),  # out of range: the id is lost too
    ('{"id": "j", "type": "call", "action": "' + "a" * 300 + '"}', "j"),
]


@pytest.mark.parametrize(("text", "id"), ANSWERED)
async def test_bad_messages_are_answered_and_the_socket_serves_on(text: str, id: Any) -> None:
    async with gateway() as (_, shop, http, url), connect(url, http) as ws:
        await ws.send_text(text)
        answer = await receive(ws)
        assert answer["type"] == "error" and answer["id"] == id
        assert answer["error"]["code"] == 400 and answer["error"]["type"] == "BAD_MESSAGE"
        assert (await call(ws, "ok", "shop.add", {"a": 1, "b": 1}))["response"] == 2
        assert shop.events == []


async def send_binary(ws: AsyncWebSocketSession) -> None:
    await ws.send_bytes(b'{"id": 1, "type": "call", "action": "shop.add"}')


async def send_huge(ws: AsyncWebSocketSession) -> None:
    await send(ws, {"id": 1, "type": "call", "action": "shop.add", "params": {"pad": "x" * (1024 * 1024)}})


async def send_invalid_utf8(ws: AsyncWebSocketSession) -> None:
    await ws.stream.write(text_frame(b'{"id": "\xff\xfe"}'))


@pytest.mark.parametrize(("hostile", "codes"), [
    (send_binary, {1003}),
    (send_huge, {1009}),
    (send_invalid_utf8, {1006, 1007}),  # hypercorn drops the TCP connection: no close frame
])
async def test_frames_the_protocol_refuses_close_the_socket_and_no_other(hostile: Any, codes: set[int]) -> None:
    async with gateway() as (broker, _, http, url), connect(url, http) as bystander:
        async with connect(url, http) as ws:
            await hostile(ws)
            try:
                frame = await ws.receive(5)
            except WebSocketDisconnect as exc:
                code = exc.code
            except WebSocketNetworkError:
                code = 1006
            else:
                pytest.fail(f"the socket was answered {frame!r} instead of closed")
        assert code in codes
        assert (await call(bystander, "ok", "shop.add", {"a": 2, "b": 5}))["response"] == 7
        async with connect(url, http) as ws:
            assert (await call(ws, "ok", "shop.add", {"a": 1, "b": 1}))["response"] == 2
        assert broker.node_id == "ws-gw"
