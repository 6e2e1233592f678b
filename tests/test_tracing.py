"""OpenTelemetry tracing (``nerve.tracing.Tracing``, docs/observability.md "Tracing"): one
trace tree per call across brokers (in-process transport and loopback TCP) and across three
real processes; span kinds, attributes, error status, events and stream transfers; Moleculer's
ids as the parent when a peer sends no ``traceparent``; a peer's garbage ``traceparent`` never
breaks a call; with no SDK the middleware wraps nothing.

Spans go to the SDK's in-memory exporter through a ``TracerProvider`` given to
``Tracing(tracer_provider=...)``, so the process's global provider stays the API's default
(the no-SDK case runs in a subprocess of its own)."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import TextMapPropagator, default_getter, default_setter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, NoOpTracerProvider, SpanContext, SpanKind, StatusCode, TraceFlags

import nerve
from nerve.errors import ClientError, RequestTimeoutError
from nerve.middleware import ActionInfo, EventInfo
from nerve.tracing import Tracing, moleculer_parent

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
TRACE_NODE = Path(__file__).with_name("trace_node.py")

_ns = itertools.count(1)


def namespace() -> str:
    return f"trace-{next(_ns)}"


class Traced:
    """A TracerProvider whose finished spans are kept in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def tracing(self) -> Tracing:
        return Tracing(tracer_provider=self.provider)

    @property
    def spans(self) -> Sequence[ReadableSpan]:
        return self.exporter.get_finished_spans()

    def find(self, name: str, kind: SpanKind, node: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name and s.kind == kind
                and (node is None or (s.attributes or {}).get("nerve.node_id") == node)]

    def one(self, name: str, kind: SpanKind, node: str | None = None) -> ReadableSpan:
        found = self.find(name, kind, node)
        assert len(found) == 1, (name, kind, node, [(s.name, s.kind, s.attributes) for s in self.spans])
        return found[0]


@pytest.fixture
def traced() -> Traced:
    return Traced()


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)


# --- services --------------------------------------------------------------------------

class Leaf(nerve.Service):
    name = "leaf"

    def __init__(self) -> None:
        self.headers: list[dict[str, Any]] = []

    @nerve.action
    async def answer(self, ctx: nerve.Context) -> dict[str, Any]:
        self.headers.append(dict(ctx.headers))
        return {"node": self.broker.node_id}

    @nerve.action
    async def refuse(self, ctx: nerve.Context) -> None:
        raise ClientError("leaf says no", 422, "LEAF_NO", {"why": "test"})

    @nerve.action
    async def crash(self, ctx: nerve.Context) -> None:
        raise ValueError("leaf broke")

    @nerve.action
    async def slow(self, ctx: nerve.Context) -> None:
        await trio.sleep(10)


class Relay(nerve.Service):
    name = "relay"

    @nerve.action
    async def go(self, ctx: nerve.Context) -> dict[str, Any]:
        leaf = await ctx.call("leaf.answer")
        inner = await ctx.call("relay.inner")
        return {"leaf": leaf, "inner": inner}

    @nerve.action
    async def inner(self, ctx: nerve.Context) -> str:
        return "inner"

    @nerve.action
    async def fail(self, ctx: nerve.Context) -> None:
        await ctx.call("leaf.refuse")

    @nerve.action
    async def announce(self, ctx: nerve.Context) -> None:
        await ctx.emit("thing.happened", {"by": "relay"})


@asynccontextmanager
async def three_brokers(traced: Traced, transport: str, **kw: Any) -> AsyncIterator[
        tuple[nerve.Broker, nerve.Broker, nerve.Broker, Leaf]]:
    """a -> b (relay) -> c (leaf), each with Tracing, on the in-process transport or TCP."""
    leaf = Leaf()
    if transport == "local":
        ns = namespace()
        async with nerve.Broker("c", namespace=ns, services=[leaf], middlewares=[traced.tracing()], **kw) as c, \
                nerve.Broker("b", namespace=ns, services=[Relay()], middlewares=[traced.tracing()], **kw) as b, \
                nerve.Broker("a", namespace=ns, middlewares=[traced.tracing()], **kw) as a:
            await a.wait_for_services("relay", timeout=5)
            await b.wait_for_services("leaf", timeout=5)
            yield a, b, c, leaf
        return
    tcp: dict[str, Any] = dict(transport="tcp://127.0.0.1:0", heartbeat_interval=0.2, **kw)
    async with nerve.Broker("c", services=[leaf], middlewares=[traced.tracing()], **tcp) as c:
        async with nerve.Broker("b", services=[Relay()], peers=[str(c.address)], middlewares=[traced.tracing()],
                                **tcp) as b:
            async with nerve.Broker("a", peers=[str(b.address)], middlewares=[traced.tracing()], **tcp) as a:
                await a.wait_for_services("relay", timeout=5)
                await b.wait_for_services("leaf", timeout=5)
                yield a, b, c, leaf


# --- one trace tree --------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["local", "tcp"])
async def test_a_call_through_three_brokers_is_one_trace_tree(traced: Traced, transport: str) -> None:
    async with three_brokers(traced, transport) as (a, b, c, leaf):
        with traced.tracer.start_as_current_span("test") as root:
            result = await a.call("relay.go")
        assert result == {"leaf": {"node": "c"}, "inner": "inner"}
        assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left attached here

    a_client = traced.one("relay/go", SpanKind.CLIENT, "a")
    b_server = traced.one("relay/go", SpanKind.SERVER, "b")
    b_client = traced.one("leaf/answer", SpanKind.CLIENT, "b")
    c_server = traced.one("leaf/answer", SpanKind.SERVER, "c")
    b_inner = traced.one("relay/inner", SpanKind.SERVER, "b")
    test_span = next(s for s in traced.spans if s.name == "test")

    assert parent_of(a_client) == root.get_span_context().span_id
    assert parent_of(b_server) == span_id(a_client)
    assert parent_of(b_client) == span_id(b_server)
    assert parent_of(c_server) == span_id(b_client)
    assert parent_of(b_inner) == span_id(b_server)  # a local call: the current span
    assert {trace_id(s) for s in traced.spans} == {trace_id(test_span)}
    assert len(traced.spans) == 6
    # Spans received from a peer have a remote parent; a local call's does not.
    assert b_server.parent is not None and b_server.parent.is_remote
    assert c_server.parent is not None and c_server.parent.is_remote
    assert b_inner.parent is not None and not b_inner.parent.is_remote

    # What went over the wire: W3C traceparent naming B's CLIENT span.
    assert leaf.headers[0]["traceparent"] == (
        f"00-{trace_id(b_client):032x}-{span_id(b_client):016x}-"
        f"{b_client.context.trace_flags if b_client.context else 0:02x}")

    assert dict(a_client.attributes or {}) | {"nerve.call_id": None, "nerve.request_id": None} == {
        "rpc.system": "moleculer", "rpc.service": "relay", "rpc.method": "go", "nerve.action": "relay.go",
        "nerve.peer.node_id": "b", "nerve.node_id": "a", "nerve.call_id": None, "nerve.request_id": None}
    attrs = dict(b_server.attributes or {})
    assert attrs["rpc.service"] == "relay" and attrs["rpc.method"] == "go"
    assert attrs["nerve.peer.node_id"] == "a" and attrs["nerve.call.remote"] is True
    assert (b_inner.attributes or {})["nerve.call.remote"] is False
    # Moleculer's ids, for matching spans with logs: the request id of the whole tree.
    request_ids = {(s.attributes or {}).get("nerve.request_id") for s in traced.spans if s.name != "test"}
    assert len(request_ids) == 1
    for span in traced.spans:
        assert span.status.status_code is StatusCode.UNSET


async def test_a_versioned_service_names_its_spans(traced: Traced) -> None:
    class Versioned(nerve.Service):
        name = "users"
        version = 2

        @nerve.action
        async def get(self, ctx: nerve.Context) -> int:
            return 1

    ns = namespace()
    async with nerve.Broker("vs", namespace=ns, services=[Versioned()], middlewares=[traced.tracing()]), \
            nerve.Broker("vc", namespace=ns, middlewares=[traced.tracing()]) as client:
        await client.wait_for_services("v2.users", timeout=5)
        assert await client.call("v2.users.get") == 1
    server = traced.one("v2.users/get", SpanKind.SERVER)
    assert (server.attributes or {})["rpc.service"] == "v2.users"
    assert (server.attributes or {})["rpc.method"] == "get"
    assert (server.attributes or {})["nerve.action"] == "v2.users.get"


async def test_with_no_current_span_a_traceparent_the_caller_gives_is_the_parent(traced: Traced) -> None:
    """An edge (an HTTP gateway) may pass on the trace context it received in ``headers=``."""
    given_trace, given_span = "ab" * 16, "cd" * 8
    headers = {"traceparent": f"00-{given_trace}-{given_span}-01"}
    async with three_brokers(traced, "local") as (a, b, c, leaf):
        await b.call("leaf.answer", headers=dict(headers))  # remote
        await b.call("relay.inner", headers=dict(headers))  # local
        with traced.tracer.start_as_current_span("current") as current:
            await b.call("leaf.answer", headers=dict(headers))  # the current span wins
    client, client_in_span = traced.find("leaf/answer", SpanKind.CLIENT)
    assert parent_of(client) == int(given_span, 16) and trace_id(client) == int(given_trace, 16)
    server, server_in_span = traced.find("leaf/answer", SpanKind.SERVER)
    assert parent_of(server) == span_id(client)
    local = traced.one("relay/inner", SpanKind.SERVER)
    assert parent_of(local) == int(given_span, 16) and trace_id(local) == int(given_trace, 16)
    assert parent_of(client_in_span) == current.get_span_context().span_id
    assert parent_of(server_in_span) == span_id(client_in_span)


# --- errors ----------------------------------------------------------------------------

async def test_failures_set_error_status_and_the_error_attributes(traced: Traced) -> None:
    async with three_brokers(traced, "local") as (a, b, c, leaf):
        with pytest.raises(ClientError):
            await a.call("relay.fail")
        with pytest.raises(nerve.errors.NerveError):
            await b.call("leaf.crash")

    c_refuse = traced.one("leaf/refuse", SpanKind.SERVER, "c")
    b_refuse = traced.one("leaf/refuse", SpanKind.CLIENT, "b")
    b_fail = traced.one("relay/fail", SpanKind.SERVER, "b")
    a_fail = traced.one("relay/fail", SpanKind.CLIENT, "a")
    for span in (c_refuse, b_refuse, b_fail, a_fail):
        assert span.status.status_code is StatusCode.ERROR, span.name
        assert "leaf says no" in (span.status.description or "")
        attrs = span.attributes or {}
        assert attrs["nerve.error.code"] == 422
        assert attrs["nerve.error.type"] == "LEAF_NO"
        assert attrs["error.type"] == "MoleculerClientError"
        assert attrs["nerve.error.retryable"] is False
        assert [e.name for e in span.events] == ["exception"]
    # The error raised on c is the one every span up the tree records.
    assert (c_refuse.events[0].attributes or {})["exception.type"] == "nerve.errors.ClientError"
    assert (b_refuse.attributes or {})["nerve.error.node_id"] == "c"

    c_crash = traced.one("leaf/crash", SpanKind.SERVER, "c")
    assert c_crash.status.status_code is StatusCode.ERROR
    assert (c_crash.attributes or {})["error.type"] == "ValueError"
    assert "nerve.error.code" not in (c_crash.attributes or {})
    b_crash = traced.one("leaf/crash", SpanKind.CLIENT, "b")
    assert b_crash.status.status_code is StatusCode.ERROR
    assert (b_crash.attributes or {})["nerve.error.code"] == 500


async def test_a_call_cut_by_its_timeout_ends_both_spans_as_errors(traced: Traced) -> None:
    async with three_brokers(traced, "local") as (a, b, c, leaf):
        with pytest.raises(RequestTimeoutError):
            await b.call("leaf.slow", timeout=0.2)
        # The callee's handler is cancelled by the budget that travelled with the REQ.
        await wait_until(lambda: bool(traced.find("leaf/slow", SpanKind.SERVER)))
    client = traced.one("leaf/slow", SpanKind.CLIENT, "b")
    server = traced.one("leaf/slow", SpanKind.SERVER, "c")
    assert client.status.status_code is StatusCode.ERROR
    assert (client.attributes or {})["error.type"] == "RequestTimeoutError"
    assert server.status.status_code is StatusCode.ERROR
    assert server.status.description == "cancelled"
    assert (server.attributes or {})["error.type"] == "cancelled"
    assert not server.events  # a cancellation is not recorded as an exception
    assert parent_of(server) == span_id(client)


# --- context never leaks between requests ----------------------------------------------

async def test_sequential_local_calls_do_not_share_a_parent(traced: Traced) -> None:
    async with nerve.Broker("solo", namespace=namespace(), services=[Relay(), Leaf()],
                            middlewares=[traced.tracing()]) as broker:
        await broker.call("leaf.answer")
        assert trace.get_current_span() is trace.INVALID_SPAN
        await broker.call("leaf.answer")
    first, second = traced.find("leaf/answer", SpanKind.SERVER)
    assert first.parent is None and second.parent is None
    assert trace_id(first) != trace_id(second)


async def test_sequential_remote_calls_do_not_share_a_parent(traced: Traced) -> None:
    """Served requests run on reused workers: what one attached is gone for the next. The
    callee's broker is started inside a span, so its workers' base context holds that span:
    a peer's request must not take it as its parent either."""
    leaf = Leaf()
    ns = namespace()
    with traced.tracer.start_as_current_span("startup"):
        server = nerve.Broker("srv", namespace=ns, services=[leaf], middlewares=[traced.tracing()])
        await server.start()
    try:
        async with nerve.Broker("traced-caller", namespace=ns, middlewares=[traced.tracing()]) as tc, \
                nerve.Broker("plain-caller", namespace=ns) as pc:
            await tc.wait_for_services("leaf", timeout=5)
            await pc.wait_for_services("leaf", timeout=5)
            for _ in range(3):
                await tc.call("leaf.answer")
                await pc.call("leaf.answer")
    finally:
        await server.stop()
    clients = traced.find("leaf/answer", SpanKind.CLIENT)
    servers = traced.find("leaf/answer", SpanKind.SERVER)
    assert len(clients) == 3 and len(servers) == 6
    assert len({trace_id(s) for s in clients}) == 3  # each call its own trace
    by_parent = {parent_of(s): s for s in servers}
    for client in clients:
        assert trace_id(by_parent[span_id(client)]) == trace_id(client)
    roots = [s for s in servers if s.parent is None]
    assert len(roots) == 3  # the plain caller's calls: fresh roots, not children of "startup"
    startup = next(s for s in traced.spans if s.name == "startup")
    assert all(trace_id(s) != trace_id(startup) for s in servers)
    assert "traceparent" not in leaf.headers[1]


# --- events ----------------------------------------------------------------------------

class Listener(nerve.Service):
    def __init__(self, name: str, group: str | None = None) -> None:
        self.name = name
        self.got: list[Any] = []
        self.group = group

    @nerve.event("thing.happened")
    async def happened(self, ctx: nerve.Context) -> None:
        self.got.append(ctx.params)


async def test_events_are_producer_and_consumer_spans(traced: Traced) -> None:
    ns = namespace()
    here, there, also = Listener("here"), Listener("there"), Listener("also")
    async with nerve.Broker("ev-b", namespace=ns, services=[Relay(), there], middlewares=[traced.tracing()]) as b, \
            nerve.Broker("ev-c", namespace=ns, services=[also], middlewares=[traced.tracing()]), \
            nerve.Broker("ev-a", namespace=ns, services=[here], middlewares=[traced.tracing()]) as a:
        await a.wait_for_services("relay", "there", "also", timeout=5)
        await b.wait_for_services("here", "also", timeout=5)
        with traced.tracer.start_as_current_span("test"):
            await a.emit("thing.happened", {"n": 1})
        await wait_until(lambda: len(traced.find("process thing.happened", SpanKind.CONSUMER)) == 3)
        emitted = traced.one("emit thing.happened", SpanKind.PRODUCER)
        consumers = traced.find("process thing.happened", SpanKind.CONSUMER)
        assert {parent_of(s) for s in consumers} == {span_id(emitted)}  # local and remote alike
        assert {trace_id(s) for s in consumers} == {trace_id(emitted)}
        attrs = dict(emitted.attributes or {})
        assert attrs == {"messaging.system": "moleculer", "messaging.operation.type": "send",
                         "messaging.operation.name": "emit", "messaging.destination.name": "thing.happened"}
        groups = {(s.attributes or {})["messaging.consumer.group.name"] for s in consumers}
        assert groups == {"here", "there", "also"}
        assert {(s.attributes or {})["nerve.peer.node_id"] for s in consumers} == {"ev-a"}

        traced.exporter.clear()
        await a.broadcast("thing.happened", {"n": 2})  # no current span: a root
        await wait_until(lambda: len(traced.find("process thing.happened", SpanKind.CONSUMER)) == 3)
        broadcast = traced.one("broadcast thing.happened", SpanKind.PRODUCER)
        assert broadcast.parent is None
        assert {parent_of(s) for s in traced.find("process thing.happened", SpanKind.CONSUMER)} == {
            span_id(broadcast)}

        traced.exporter.clear()
        await a.call("relay.announce")  # ctx.emit in a served action: a child of its span
        await wait_until(lambda: len(traced.find("process thing.happened", SpanKind.CONSUMER)) == 3)
        server = traced.one("relay/announce", SpanKind.SERVER)
        emitted = traced.one("emit thing.happened", SpanKind.PRODUCER)
        assert parent_of(emitted) == span_id(server)
        assert {parent_of(s) for s in traced.find("process thing.happened", SpanKind.CONSUMER)} == {
            span_id(emitted)}


async def test_an_emit_keeps_the_callers_headers_and_dict(traced: Traced) -> None:
    ns = namespace()
    seen: list[dict[str, Any]] = []

    class Seer(nerve.Service):
        name = "seer"

        @nerve.event("thing.happened")
        async def happened(self, ctx: nerve.Context) -> None:
            seen.append(dict(ctx.headers))

    mine = {"x-tenant": "t1"}
    async with nerve.Broker("hd-b", namespace=ns, services=[Seer()]), \
            nerve.Broker("hd-a", namespace=ns, middlewares=[traced.tracing()]) as a:
        await a.wait_for_services("seer", timeout=5)
        await a.emit("thing.happened", headers=mine)
        await wait_until(lambda: bool(seen))
    assert mine == {"x-tenant": "t1"}  # the caller's dict is not written into
    assert seen[0]["x-tenant"] == "t1"
    producer = traced.one("emit thing.happened", SpanKind.PRODUCER)
    assert seen[0]["traceparent"].split("-")[2] == f"{span_id(producer):016x}"


async def test_a_failing_event_handler_marks_its_span(traced: Traced) -> None:
    class Broken(nerve.Service):
        name = "broken"

        @nerve.event("thing.happened")
        async def happened(self, ctx: nerve.Context) -> None:
            raise ClientError("bad event", 400, "BAD_EVENT")

    async with nerve.Broker("ev-fail", namespace=namespace(), services=[Broken()],
                            middlewares=[traced.tracing()]) as broker:
        await broker.emit("thing.happened")
        await wait_until(lambda: bool(traced.find("process thing.happened", SpanKind.CONSUMER)))
    span = traced.one("process thing.happened", SpanKind.CONSUMER)
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["nerve.error.type"] == "BAD_EVENT"


# --- streams ---------------------------------------------------------------------------

CHUNK = 4096
COUNT = 16


class Files(nerve.Service):
    name = "files"

    @nerve.action
    async def upload(self, ctx: nerve.Context) -> int:
        total = 0
        assert ctx.stream is not None
        async for chunk in ctx.stream:
            total += len(chunk)
        return total

    @nerve.action
    async def download(self, ctx: nerve.Context) -> nerve.PacketStream:
        async def gen() -> Any:
            for _ in range(COUNT):
                yield b"d" * CHUNK

        return nerve.PacketStream.from_iterable(gen(), max_chunk=CHUNK)


async def _chunks() -> Any:
    for _ in range(COUNT):
        yield b"u" * CHUNK


@asynccontextmanager
async def tcp_files(traced: Traced) -> AsyncIterator[tuple[nerve.Broker, nerve.Broker]]:
    tcp: dict[str, Any] = dict(transport="tcp://127.0.0.1:0", heartbeat_interval=0.2)
    async with nerve.Broker("fs", services=[Files()], middlewares=[traced.tracing()], **tcp) as server:
        async with nerve.Broker("fc", peers=[str(server.address)], middlewares=[traced.tracing()], **tcp) as client:
            await client.wait_for_services("files", timeout=5)
            yield server, client


async def test_a_request_stream_is_a_span_of_the_caller(traced: Traced) -> None:
    async with tcp_files(traced) as (server, client):
        stream = nerve.PacketStream.from_iterable(_chunks(), max_chunk=CHUNK)
        assert await client.call("files.upload", stream=stream) == CHUNK * COUNT
        await wait_until(lambda: bool(traced.find("files/upload stream", SpanKind.INTERNAL)))
    client_span = traced.one("files/upload", SpanKind.CLIENT)
    server_span = traced.one("files/upload", SpanKind.SERVER)
    transfer = traced.one("files/upload stream", SpanKind.INTERNAL)
    assert parent_of(transfer) == span_id(client_span)
    attrs = transfer.attributes or {}
    assert attrs["nerve.stream.bytes"] == CHUNK * COUNT
    assert attrs["nerve.stream.chunks"] == COUNT
    assert attrs["nerve.stream.direction"] == "request"
    assert (server_span.attributes or {})["nerve.stream.bytes_received"] == CHUNK * COUNT
    assert parent_of(server_span) == span_id(client_span)


async def test_a_response_stream_is_a_span_of_the_server_ended_when_it_closes(traced: Traced) -> None:
    async with tcp_files(traced) as (server, client):
        reader = await client.call("files.download")
        assert traced.find("files/download", SpanKind.SERVER)
        data = await reader.read_all()
        assert len(data) == CHUNK * COUNT
        await wait_until(lambda: bool(traced.find("files/download stream", SpanKind.INTERNAL)))
    server_span = traced.one("files/download", SpanKind.SERVER)
    transfer = traced.one("files/download stream", SpanKind.INTERNAL)
    assert parent_of(transfer) == span_id(server_span)
    assert trace_id(transfer) == trace_id(server_span)
    attrs = transfer.attributes or {}
    assert attrs["nerve.stream.direction"] == "response"
    assert attrs["nerve.stream.bytes"] == CHUNK * COUNT
    assert attrs["nerve.stream.chunks"] == COUNT
    assert transfer.end_time is not None and server_span.end_time is not None
    assert transfer.end_time >= server_span.end_time  # it outlives the handler


async def test_a_stream_its_reader_stops_early_still_ends_its_span(traced: Traced) -> None:
    async with tcp_files(traced) as (server, client):
        reader = await client.call("files.download")
        first = await reader.receive()
        assert first
        await reader.close()
        await wait_until(lambda: bool(traced.find("files/download stream", SpanKind.INTERNAL)))
    transfer = traced.one("files/download stream", SpanKind.INTERNAL)
    sent = (transfer.attributes or {})["nerve.stream.bytes"]
    assert isinstance(sent, int) and 0 < sent <= CHUNK * COUNT


async def test_a_local_calls_streams_are_children_of_its_server_span(traced: Traced) -> None:
    async with nerve.Broker("fl", namespace=namespace(), services=[Files()],
                            middlewares=[traced.tracing()]) as broker:
        stream = nerve.PacketStream.from_iterable(_chunks(), max_chunk=CHUNK)
        assert await broker.call("files.upload", stream=stream) == CHUNK * COUNT
        reader = await broker.call("files.download")
        assert len(await reader.read_all()) == CHUNK * COUNT
        await wait_until(lambda: len(traced.find("files/download stream", SpanKind.INTERNAL)) == 1
                         and len(traced.find("files/upload stream", SpanKind.INTERNAL)) == 1)
    for action in ("upload", "download"):
        server = traced.one(f"files/{action}", SpanKind.SERVER)
        transfer = traced.one(f"files/{action} stream", SpanKind.INTERNAL)
        assert parent_of(transfer) == span_id(server)
        assert (transfer.attributes or {})["nerve.stream.bytes"] == CHUNK * COUNT


async def test_a_stream_of_an_untraced_call_has_no_span(traced: Traced) -> None:
    # The server traces, the caller does not: the caller's request stream has no span.
    tcp: dict[str, Any] = dict(transport="tcp://127.0.0.1:0", heartbeat_interval=0.2)
    async with nerve.Broker("fs2", services=[Files()], middlewares=[traced.tracing()], **tcp) as server:
        async with nerve.Broker("fc2", peers=[str(server.address)], middlewares=[Tracing(NoOpTracerProvider())],
                                **tcp) as client:
            await client.wait_for_services("files", timeout=5)
            stream = nerve.PacketStream.from_iterable(_chunks(), max_chunk=CHUNK)
            assert await client.call("files.upload", stream=stream) == CHUNK * COUNT
    assert [s.name for s in traced.spans] == ["files/upload"]


async def test_a_stream_its_producer_never_ends_is_ended_when_the_broker_stops(traced: Traced) -> None:
    class Dribble(nerve.Service):
        name = "dribble"

        @nerve.action
        async def feed(self, ctx: nerve.Context) -> nerve.PacketStream:
            stream = nerve.PacketStream()

            async def one_chunk_then_nothing() -> None:
                await stream.send(b"x" * 10)

            self.broker.start_soon(one_chunk_then_nothing)
            return stream

    async with nerve.Broker("dribbler", namespace=namespace(), services=[Dribble()],
                            middlewares=[traced.tracing()]) as broker:
        reader = await broker.call("dribble.feed")
        assert await reader.receive() == b"x" * 10
        assert not traced.find("dribble/feed stream", SpanKind.INTERNAL)
    transfer = traced.one("dribble/feed stream", SpanKind.INTERNAL)
    assert (transfer.attributes or {})["nerve.stream.unfinished"] is True
    assert (transfer.attributes or {})["nerve.stream.bytes"] == 10


# --- Moleculer's ids -------------------------------------------------------------------

def test_moleculer_ids_parse_only_as_uuids() -> None:
    rid, pid = uuid.uuid4(), uuid.uuid4()
    sc = moleculer_parent(str(rid), str(pid))
    assert sc is not None and sc.is_remote and sc.trace_flags.sampled
    assert sc.trace_id == rid.int
    assert sc.span_id == pid.int >> 64
    assert moleculer_parent(rid.hex, pid.hex) == sc
    for bad in ("abc123-7", str(rid)[:-1], str(rid) + "0", "g" * 32, "0" * 32, None, 5, ["x"], rid.bytes):
        assert moleculer_parent(bad, str(pid)) is None, bad
        assert moleculer_parent(str(rid), bad) is None, bad
    assert moleculer_parent(str(rid), "0" * 16 + "1" * 16) is None  # a zero span id
    assert not moleculer_parent(str(rid), str(pid), sampled=False).trace_flags.sampled  # type: ignore[union-attr]


async def test_moleculer_callers_tracing_flag_false_is_not_sampled_by_a_parent_based_sampler() -> None:
    """A moleculer.js caller that did not sample its call tree sends ``tracing: false``: with
    the SDK's default (parent-based) sampler, nerve records nothing for it; ``true`` or no flag
    is recorded; and nerve's own CLIENT span sets the flag on the REQ it sends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ns = namespace()
    leaf = Leaf()
    rid, pid = uuid.uuid4(), uuid.uuid4()
    async with nerve.Broker("mlf-s", namespace=ns, services=[leaf],
                            middlewares=[Tracing(tracer_provider=provider)]) as server, \
            nerve.Broker("mlf-c", namespace=ns) as caller:
        await caller.wait_for_services("leaf", timeout=5)
        for flag in (False, True, None):
            parent = nerve.Context(caller, id=str(pid), request_id=str(rid))
            parent.tracing = flag
            await caller.call("leaf.answer", parent_ctx=parent)
        served = [sp for sp in exporter.get_finished_spans() if sp.kind is SpanKind.SERVER]
        assert len(served) == 2 and all(trace_id(sp) == rid.int for sp in served)
        flags: list[object] = []

        class Spy(nerve.Middleware):
            def local_action(self, next: Any, action: Any) -> Any:
                async def spy(ctx: nerve.Context) -> Any:
                    flags.append(ctx.tracing)
                    return await next(ctx)
                return spy

        async with nerve.Broker("mlf-t", namespace=ns, services=[Leaf()], middlewares=[Spy()]):
            await server.wait_for_services("leaf", timeout=5)
            await trio.sleep(0.05)
            await server.call("leaf.answer", node_id="mlf-t")
        assert flags == [True]


async def test_a_peer_without_traceparent_but_with_moleculer_ids_gives_the_parent(traced: Traced) -> None:
    """As a moleculer.js caller: requestID / parentID UUIDs, no traceparent header."""
    ns = namespace()
    leaf = Leaf()
    rid, pid = uuid.uuid4(), uuid.uuid4()
    async with nerve.Broker("ml-s", namespace=ns, services=[leaf], middlewares=[traced.tracing()]), \
            nerve.Broker("ml-c", namespace=ns) as caller:
        await caller.wait_for_services("leaf", timeout=5)
        parent = nerve.Context(caller, id=str(pid), request_id=str(rid))
        await caller.call("leaf.answer", parent_ctx=parent)
        # A traceparent wins over the ids.
        tp_trace, tp_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        await caller.call("leaf.answer", parent_ctx=parent, headers={"traceparent": f"00-{tp_trace}-{tp_span}-01"})
        # Ids that are not UUIDs (a nerve caller's): a root.
        await caller.call("leaf.answer", parent_ctx=nerve.Context(caller, id="a1b2-1", request_id="a1b2-1"))
    by_ids, by_header, root = traced.find("leaf/answer", SpanKind.SERVER)
    assert trace_id(by_ids) == rid.int
    assert by_ids.parent is not None and by_ids.parent.is_remote
    assert parent_of(by_ids) == int(pid.hex[:16], 16)
    assert trace_id(by_header) == int(tp_trace, 16) and parent_of(by_header) == int(tp_span, 16)
    assert root.parent is None and trace_id(root) not in (rid.int, int(tp_trace, 16))


async def test_protocol_4_carries_no_headers_so_each_node_starts_its_own_trace(traced: Traced) -> None:
    async with three_brokers(traced, "local", protocol_version="4") as (a, b, c, leaf):
        await b.call("leaf.answer")
    assert leaf.headers == [{}]
    assert traced.one("leaf/answer", SpanKind.SERVER).parent is None


# --- a peer's garbage ------------------------------------------------------------------

VALID = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
GARBAGE: list[tuple[str, Any]] = [
    ("int", 5),
    ("float", 1.5),
    ("bool", True),
    ("null", None),
    ("list holding a valid one", [VALID]),
    ("dict", {"traceparent": VALID}),
    ("invalid UTF-8 bytes", b"\xff\xfe\xfd" + VALID.encode()),
    ("10 MB string", "0" * 10_000_000),
    ("10 MB valid-looking prefix", VALID + "-" + "f" * 10_000_000),
    # A future version may append fields, so the W3C parser alone would take this one.
    ("10 MB future version", "cc-" + "ab" * 16 + "-" + "cd" * 8 + "-01-" + "f" * 10_000_000),
    ("malformed hex", "00-" + "zz" * 16 + "-" + "cd" * 8 + "-01"),
    ("zero trace id", "00-" + "00" * 16 + "-" + "cd" * 8 + "-01"),
    ("zero span id", "00-" + "ab" * 16 + "-" + "00" * 8 + "-01"),
    ("version ff", "ff-" + "ab" * 16 + "-" + "cd" * 8 + "-01"),
    ("too short", "00-ab-cd-01"),
    ("empty", ""),
    ("lone surrogate escaped", "00-\udcff"),
]


async def test_a_garbage_traceparent_never_breaks_a_call(traced: Traced) -> None:
    """A peer (no Tracing of its own) sends garbage in ``traceparent`` / ``tracestate``: the
    call is answered, and served under a fresh root span."""
    leaf = Leaf()
    tcp: dict[str, Any] = dict(transport="tcp://127.0.0.1:0", heartbeat_interval=0.2,
                               max_frame_size=64 * 1024 * 1024)
    async with nerve.Broker("gb-s", services=[leaf], middlewares=[traced.tracing()], **tcp) as server:
        async with nerve.Broker("gb-c", peers=[str(server.address)], **tcp) as caller:
            await caller.wait_for_services("leaf", timeout=5)
            for label, value in GARBAGE:
                traced.exporter.clear()
                headers = {"traceparent": value, "tracestate": value, "baggage": value}
                try:
                    answer = await caller.call("leaf.answer", headers=headers, timeout=20)
                except nerve.errors.SerializationError:
                    # The caller's own serializer refuses it (a lone surrogate): nothing was
                    # sent, so nothing is served; the server is not involved.
                    assert label == "lone surrogate escaped"
                    continue
                assert answer == {"node": "gb-s"}, label
                span = traced.one("leaf/answer", SpanKind.SERVER)
                assert span.parent is None, label
                assert span.status.status_code is StatusCode.UNSET, label
            # A valid traceparent beside a garbage tracestate: the parent is kept.
            for tracestate in (5, "=" * 10_000_000, ["a=b"], "not a list,,,=,"):
                traced.exporter.clear()
                await caller.call("leaf.answer", headers={"traceparent": VALID, "tracestate": tracestate})
                span = traced.one("leaf/answer", SpanKind.SERVER)
                assert parent_of(span) == int("cd" * 8, 16), tracestate
                assert trace_id(span) == int("ab" * 16, 16)


async def test_garbage_event_headers_never_break_an_event(traced: Traced) -> None:
    ns = namespace()
    listener = Listener("garbage-listener")
    async with nerve.Broker("ge-s", namespace=ns, services=[listener], middlewares=[traced.tracing()]), \
            nerve.Broker("ge-c", namespace=ns) as caller:
        await caller.wait_for_services("garbage-listener", timeout=5)
        for n, (label, value) in enumerate(GARBAGE):
            if label == "lone surrogate escaped":
                continue
            await caller.emit("thing.happened", {"n": n}, headers={"traceparent": value})
        await wait_until(lambda: len(listener.got) == len(GARBAGE) - 1)
    consumers = traced.find("process thing.happened", SpanKind.CONSUMER)
    assert len(consumers) == len(GARBAGE) - 1
    assert all(s.parent is None for s in consumers)


class Plain(TextMapPropagator):
    """A propagator of its own format (``x-trace: <trace hex>:<span hex>``), recording what the
    getter hands it; ``broken`` makes it raise."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.seen: list[Any] = []

    def extract(self, carrier: Any, context: Any = None, getter: Any = default_getter) -> Any:
        if self.broken:
            raise RuntimeError("extract broke")
        context = context if context is not None else otel_context.Context()
        values = getter.get(carrier, "x-trace")
        self.seen.append(values)
        if not values:
            return context
        trace_hex, _, span_hex = values[0].partition(":")
        try:
            sc = SpanContext(int(trace_hex, 16), int(span_hex, 16), is_remote=True,
                             trace_flags=TraceFlags(TraceFlags.SAMPLED))
        except ValueError:
            return context
        return trace.set_span_in_context(NonRecordingSpan(sc), context)

    def inject(self, carrier: Any, context: Any = None, setter: Any = default_setter) -> None:
        if self.broken:
            raise RuntimeError("inject broke")
        sc = trace.get_current_span(context).get_span_context()
        setter.set(carrier, "x-trace", f"{sc.trace_id:x}:{sc.span_id:x}")

    @property
    def fields(self) -> set[str]:
        return {"x-trace"}


async def test_a_propagator_of_ones_own_carries_the_context(traced: Traced) -> None:
    ns = namespace()
    leaf = Leaf()
    server_side = Plain()
    async with nerve.Broker("pp-s", namespace=ns, services=[leaf],
                            middlewares=[Tracing(traced.provider, propagator=server_side)]), \
            nerve.Broker("pp-c", namespace=ns, middlewares=[Tracing(traced.provider, propagator=Plain())]) as c, \
            nerve.Broker("pp-x", namespace=ns) as plain:
        await c.wait_for_services("leaf", timeout=5)
        await plain.wait_for_services("leaf", timeout=5)
        await c.call("leaf.answer")
        assert set(leaf.headers[0]) == {"x-trace"}
        client = traced.one("leaf/answer", SpanKind.CLIENT)
        server = traced.one("leaf/answer", SpanKind.SERVER)
        assert parent_of(server) == span_id(client) and trace_id(server) == trace_id(client)
        # What a peer sends reaches a propagator only as a string of at most 8 KiB.
        server_side.seen.clear()
        for value in ("1" * 10_000, 5, b"12:34", ["12:34"], "1" * 8192 + ":1", "12:34"):
            await plain.call("leaf.answer", headers={"x-trace": value})
        assert server_side.seen == [None, None, None, None, None, ["12:34"]]


async def test_a_failing_propagator_never_fails_a_call(traced: Traced) -> None:
    ns = namespace()
    async with nerve.Broker("bp-s", namespace=ns, services=[Leaf()],
                            middlewares=[Tracing(traced.provider, propagator=Plain(broken=True))]), \
            nerve.Broker("bp-c", namespace=ns,
                         middlewares=[Tracing(traced.provider, propagator=Plain(broken=True))]) as c:
        await c.wait_for_services("leaf", timeout=5)
        assert await c.call("leaf.answer", headers={"x-trace": "1:2"}) == {"node": "bp-s"}
        await c.emit("thing.happened")
    assert traced.one("leaf/answer", SpanKind.SERVER).parent is None
    assert traced.one("leaf/answer", SpanKind.CLIENT).status.status_code is StatusCode.UNSET


# --- no SDK: nothing wrapped -----------------------------------------------------------

def test_a_noop_provider_wraps_nothing() -> None:
    mw = Tracing(tracer_provider=NoOpTracerProvider())

    async def handler(ctx: Any) -> None:
        return None

    async def emit(event: str, data: Any, opts: Any) -> None:
        return None

    info = ActionInfo("x.y", "x", "n", True)
    assert mw.local_action(handler, info) is handler
    assert mw.remote_action(handler, info) is handler
    assert mw.local_event(handler, EventInfo("e", "g", "x")) is handler
    assert mw.emit(emit) is emit
    assert mw.broadcast(emit) is emit


NO_SDK = textwrap.dedent("""
    import trio
    from opentelemetry import trace
    import nerve
    from nerve.middleware import ActionInfo, EventInfo
    from nerve.tracing import Tracing

    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)

    async def handler(ctx):
        return None

    async def emit(event, data, opts):
        return None

    mw = Tracing()
    info = ActionInfo("x.y", "x", "n", True)
    assert mw.local_action(handler, info) is handler
    assert mw.remote_action(handler, info) is handler
    assert mw.local_event(handler, EventInfo("e", "g", "x")) is handler
    assert mw.emit(emit) is emit and mw.broadcast(emit) is emit

    seen = []

    class Leaf(nerve.Service):
        name = "leaf"

        @nerve.action
        async def answer(self, ctx):
            seen.append(dict(ctx.headers))
            return trace.get_current_span() is trace.INVALID_SPAN

        @nerve.action
        async def download(self, ctx):
            async def gen():
                yield b"x" * 1000
            return nerve.PacketStream.from_iterable(gen())

    async def main():
        async with nerve.Broker("s", namespace="nosdk", services=[Leaf()], middlewares=[Tracing()]), \\
                nerve.Broker("c", namespace="nosdk", middlewares=[Tracing()]) as c:
            await c.wait_for_services("leaf", timeout=5)
            assert await c.call("leaf.answer", headers={"x": 1}) is True
            assert len(await (await c.call("leaf.download")).read_all()) == 1000
        assert seen == [{"x": 1}], seen  # no trace context injected

    trio.run(main)

    # With an SDK set, chains built from now on are traced.
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())
    assert mw.local_action(handler, info) is not handler
    print("no-sdk ok")
""")


def test_with_no_sdk_nothing_is_wrapped_or_sent() -> None:
    out = subprocess.run([sys.executable, "-c", NO_SDK], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no-sdk ok"


def test_without_the_api_the_import_error_names_the_extra() -> None:
    script = ("import sys\nsys.modules['opentelemetry'] = None\nimport nerve\n"
              "try:\n    import nerve.tracing\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "'tracing' extra" in out.stdout and "pip install opentelemetry-api" in out.stdout


def test_the_docs_example_runs_and_prints_what_it_says(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "observability.md").read_text()
    section = text[text.index("## Tracing"):]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    script = tmp_path / "example.py"
    script.write_text(block.group(1))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["hello trace", "SERVER greeter/hello <- CLIENT greeter/hello",
                                       "CLIENT greeter/hello <- none"]
    for line in out.stdout.splitlines():
        assert f"`{line}`" in section


# --- three processes -------------------------------------------------------------------

class Processes:
    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, node_id: str, role: str, *peers: str) -> dict[str, Any]:
        args = [sys.executable, str(TRACE_NODE), "--node-id", node_id, "--role", role]
        for peer in peers:
            args += ["--peer", peer]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        self.procs[node_id] = proc
        return self.line(node_id)

    def line(self, node_id: str) -> dict[str, Any]:
        proc = self.procs[node_id]
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"{node_id} exited with {proc.wait()}"
        return json.loads(line)  # type: ignore[no-any-return]

    def stop(self, node_id: str) -> None:
        proc = self.procs[node_id]
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def processes() -> Iterator[Processes]:
    p = Processes()
    try:
        yield p
    finally:
        p.close()


def test_a_call_through_three_processes_is_one_trace_tree(processes: Processes) -> None:
    """A calls B's action, which calls C's action, over loopback TCP: each process exports its
    own spans (the SDK's in-memory exporter); together they make one tree."""
    c = processes.start("trace-c", "c")
    b = processes.start("trace-b", "b", c["address"])
    processes.start("trace-a", "a", b["address"])
    deadline = time.monotonic() + 60
    result = processes.line("trace-a")
    assert time.monotonic() < deadline
    assert result["result"]["node"] == "trace-b"
    assert result["result"]["leaf"]["node"] == "trace-c"
    a_spans = processes.line("trace-a")["spans"]
    processes.stop("trace-a")
    processes.stop("trace-b")
    b_spans = processes.line("trace-b")["spans"]
    processes.stop("trace-c")
    c_spans = processes.line("trace-c")["spans"]

    assert [(s["name"], s["kind"]) for s in a_spans] == [("relay/go", "CLIENT")]
    assert sorted((s["name"], s["kind"]) for s in b_spans) == [("leaf/answer", "CLIENT"), ("relay/go", "SERVER")]
    assert [(s["name"], s["kind"]) for s in c_spans] == [("leaf/answer", "SERVER")]
    a_client = a_spans[0]
    b_server = next(s for s in b_spans if s["kind"] == "SERVER")
    b_client = next(s for s in b_spans if s["kind"] == "CLIENT")
    c_server = c_spans[0]
    every = [a_client, b_server, b_client, c_server]
    assert len({s["trace_id"] for s in every}) == 1
    assert a_client["parent_span_id"] is None
    assert b_server["parent_span_id"] == a_client["span_id"] and b_server["parent_is_remote"]
    assert b_client["parent_span_id"] == b_server["span_id"] and not b_client["parent_is_remote"]
    assert c_server["parent_span_id"] == b_client["span_id"] and c_server["parent_is_remote"]
    assert [s["service"] for s in every] == ["trace-a", "trace-b", "trace-b", "trace-c"]
    assert all(s["status"] == "UNSET" for s in every)
    # What C was sent names B's CLIENT span.
    assert result["result"]["leaf"]["traceparent"].split("-")[1:3] == [b_client["trace_id"], b_client["span_id"]]
