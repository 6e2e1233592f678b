"""Streams between nerve and real moleculer.js nodes (0.15 and 0.14, JSON and MsgPack) over a
real NATS server: uploads and downloads both ways checked by SHA-256, an error mid-stream, a
slow moleculer.js consumer; and calls and events both ways with the balancer disabled."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import trio

import nerve
from nerve.errors import NerveError

from moleculer_js import (MoleculerNode, generated_chunks, generated_sha256, moleculer_node,
                          unique_namespace)
from nats_server import ensure_nats

SIZE = 3 * 1024 * 1024 + 123  # chunks of neither side line up with the end
CASE_TIMEOUT = 60.0
COMBOS = [("0.15", "json"), ("0.15", "msgpack"), ("0.14", "json"), ("0.14", "msgpack")]
COMBO_IDS = [f"{version}-{serializer}" for version, serializer in COMBOS]


class PyStream(nerve.Service):
    """nerve's side of the stream tests: what moleculer.js calls."""

    name = "pystream"

    @nerve.action
    async def upload(self, ctx: nerve.Context) -> dict[str, Any]:
        assert ctx.stream is not None, "no request stream"
        h = hashlib.sha256()
        n = 0
        async for chunk in ctx.stream:
            h.update(chunk)
            n += len(chunk)
        return {"bytes": n, "sha256": h.hexdigest(), "meta": dict(ctx.meta), "params": ctx.params}

    @nerve.action
    async def download(self, ctx: nerve.Context) -> nerve.PacketStream:
        size, seed = int(ctx.params["size"]), int(ctx.params.get("seed", 0))
        ctx.meta["size"] = size
        return nerve.PacketStream.from_iterable(generated_chunks(size, seed))


class MulParams(msgspec.Struct):
    a: int
    b: int


class PyMath(nerve.Service):
    name = "pymath"

    @nerve.action
    async def mul(self, ctx: nerve.Context, params: MulParams) -> int:
        ctx.meta["py"] = "was here too"
        return params.a * params.b


class PyListener(nerve.Service):
    name = "pylistener"

    def __init__(self) -> None:
        self.got: list[Any] = []

    @nerve.event("js.hello")
    async def hello(self, ctx: nerve.Context) -> None:
        self.got.append(ctx.params)


@pytest.fixture(scope="module")
def nats() -> str:
    return ensure_nats()


@pytest.fixture(params=COMBOS, ids=COMBO_IDS)
def js(request: pytest.FixtureRequest, nats: str) -> Iterator[MoleculerNode]:
    """A moleculer.js node of one version and serializer, in a namespace of this test's own."""
    version, serializer = request.param
    with moleculer_node(version, serializer, node_id="js-node", namespace=unique_namespace(), nats_url=nats) as node:
        yield node


@asynccontextmanager
async def nerve_node(js: MoleculerNode, nats: str, *services: nerve.Service, **kw: Any) -> AsyncIterator[nerve.Broker]:
    """A nerve broker in ``js``'s cluster, once a plain call to moleculer.js has worked (so a
    failure after this is the stream's, not the harness's) and moleculer.js sees ``services``."""
    async with nerve.Broker("py-node", transport=nats, namespace=js.namespace, serializer=js.serializer,
                            protocol_version=js.protocol_version, services=list(services),
                            heartbeat_interval=1, heartbeat_timeout=3, **kw) as b:
        await b.wait_for_services("jsmath", "jsstream", timeout=20)
        assert await b.call("jsmath.add", {"a": 1, "b": 2}) == 3
        names = [s.name for s in services]
        if names:
            assert await b.call("jsmath.waitFor", {"services": names}) is True
        yield b


def run(case: Any) -> None:
    async def main() -> None:
        with trio.fail_after(CASE_TIMEOUT):
            await case()

    trio.run(main)


def test_nerve_uploads_to_moleculer_js(js: MoleculerNode, nats: str) -> None:
    async def case() -> None:
        async with nerve_node(js, nats) as b:
            # protocol 4 has no params beside a request stream (the stream is the params)
            params = {"name": "up.bin"} if js.protocol_version == "5" else None
            stream = nerve.PacketStream.from_iterable(generated_chunks(SIZE, 3))
            got = await b.call("jsstream.upload", params, meta={"filename": "up.bin"}, stream=stream)
            assert (got["bytes"], got["sha256"]) == (SIZE, generated_sha256(SIZE, 3))
            assert got["meta"]["filename"] == "up.bin"
            assert got["params"] == params

    run(case)


def test_nerve_downloads_from_moleculer_js(js: MoleculerNode, nats: str) -> None:
    async def case() -> None:
        async with nerve_node(js, nats) as b:
            meta: dict[str, Any] = {}
            stream = await b.call("jsstream.download", {"size": SIZE, "seed": 5}, meta=meta)
            assert isinstance(stream, nerve.PacketStream)
            assert meta["size"] == SIZE
            data = await stream.read_all()
            assert len(data) == SIZE
            assert hashlib.sha256(data).hexdigest() == generated_sha256(SIZE, 5)

    run(case)


def test_moleculer_js_uploads_to_nerve(js: MoleculerNode, nats: str) -> None:
    async def case() -> None:
        async with nerve_node(js, nats, PyStream()) as b:
            got = await b.call("jsstream.callPyUpload", {"action": "pystream.upload", "size": SIZE, "seed": 9})
            assert (got["bytes"], got["sha256"]) == (SIZE, generated_sha256(SIZE, 9))
            assert got["meta"]["size"] == SIZE
            if js.protocol_version == "5":
                assert got["params"] == {"size": SIZE}

    run(case)


class PySlow(nerve.Service):
    """A consumer far slower than moleculer.js produces (it has no flow control)."""

    name = "pyslow"

    def __init__(self) -> None:
        self.failures: list[BaseException] = []
        self.peak = 0

    @nerve.action
    async def upload(self, ctx: nerve.Context) -> int:
        assert ctx.stream is not None
        n = 0
        try:
            async for chunk in ctx.stream:
                n += len(chunk)
                self.peak = max(self.peak, ctx.stream.statistics().bytes_buffered)
                await trio.sleep(0.05)
        except nerve.errors.StreamError as exc:
            self.failures.append(exc)
            raise
        return n


def test_a_moleculer_js_producer_cannot_outgrow_a_slow_nerve_consumer(js: MoleculerNode, nats: str) -> None:
    """moleculer.js streams without flow control: against a slow nerve handler the stream fails
    with StreamOverflowError once max_stream_buffer is unread; nerve never holds more."""
    limit = 1024 * 1024

    async def case() -> None:
        slow = PySlow()
        async with nerve_node(js, nats, slow, max_stream_buffer=limit) as b:
            with pytest.raises(nerve.errors.NerveError) as info:
                await b.call("jsstream.callPyUpload", {"action": "pyslow.upload", "size": 8 * 1024 * 1024, "seed": 1})
            assert info.value.name == "StreamOverflowError", repr(info.value)
            assert len(slow.failures) == 1 and isinstance(slow.failures[0], nerve.errors.StreamOverflowError)
            assert slow.peak <= limit
            assert b.statistics().transit.streams_reading == 0
            # the node serves on: a normal upload afterwards
            got = await b.call("jsstream.callPyUpload", {"action": "pyslow.upload", "size": 20_000, "seed": 2})
            assert got == 20_000

    run(case)


def test_moleculer_js_downloads_from_nerve(js: MoleculerNode, nats: str) -> None:
    async def case() -> None:
        async with nerve_node(js, nats, PyStream()) as b:
            got = await b.call("jsstream.callPyDownload", {"action": "pystream.download", "size": SIZE, "seed": 11})
            assert (got["bytes"], got["sha256"]) == (SIZE, generated_sha256(SIZE, 11))
            assert got["meta"]["size"] == SIZE

    run(case)


def test_an_error_mid_stream_from_moleculer_js(js: MoleculerNode, nats: str) -> None:
    """moleculer.js's stream fails after 3 chunks of 64 KiB: the call itself succeeded (the
    response stream opened); reading it raises the error moleculer.js sent."""

    async def case() -> None:
        async with nerve_node(js, nats) as b:
            stream = await b.call("jsstream.failMidway", {"chunks": 3})
            assert isinstance(stream, nerve.PacketStream)
            n = 0
            with pytest.raises(NerveError, match="broken on purpose") as info:
                async for chunk in stream:
                    n += len(chunk)
            assert n <= 3 * 64 * 1024
            assert (info.value.code, info.value.type) == (500, "BROKEN")
            # the node serves on
            assert await b.call("jsmath.add", {"a": 2, "b": 3}) == 5

    run(case)


def test_a_slow_moleculer_js_consumer(js: MoleculerNode, nats: str) -> None:
    """moleculer.js reads 64 KiB per 40 ms (its transit has no flow control: what nerve sends
    faster waits in its buffers); the content still arrives whole."""
    slow_ms = 40

    async def case() -> None:
        async with nerve_node(js, nats) as b:
            started = trio.current_time()
            stream = nerve.PacketStream.from_iterable(generated_chunks(SIZE, 13))
            got = await b.call("jsstream.upload", meta={"slowMs": slow_ms}, stream=stream)
            assert (got["bytes"], got["sha256"]) == (SIZE, generated_sha256(SIZE, 13))
            assert trio.current_time() - started >= 0.9 * slow_ms / 1000 * SIZE / (64 * 1024)

    run(case)


@pytest.mark.parametrize(("version", "serializer"), COMBOS, ids=COMBO_IDS)
def test_calls_and_events_with_the_balancer_disabled(nats: str, version: str, serializer: str) -> None:
    """Both sides leave balancing to NATS (queue groups: REQB.<action>, EVENTB.<group>.<event>)."""
    listener = PyListener()

    async def case(js: MoleculerNode) -> None:
        async with nerve_node(js, nats, PyMath(), listener, disable_balancer=True) as b:
            # nerve -> moleculer.js, meta merged back
            meta: dict[str, Any] = {"from": "python"}
            assert await b.call("jsmath.add", {"a": 4, "b": 5}, meta=meta) == 9
            assert meta == {"from": "python", "js": "was here"}
            # moleculer.js -> nerve
            out = await b.call("jsmath.viaPython", {"a": 6, "b": 7})
            assert out["product"] == 42 and out["meta"]["py"] == "was here too"
            # events, nerve -> moleculer.js
            await b.emit("py.hello", {"n": 1})
            while not await b.call("jsmath.events"):
                await trio.sleep(0.05)
            assert await b.call("jsmath.events") == [{"n": 1}]
            # events, moleculer.js -> nerve
            await b.call("jsmath.emitEvent", {"event": "js.hello", "payload": {"m": 2}})
            while not listener.got:
                await trio.sleep(0.05)
            await trio.sleep(0.2)  # one handler per group: no second delivery
            assert listener.got == [{"m": 2}]

    with moleculer_node(version, serializer, disable_balancer=True, namespace=unique_namespace(),
                        nats_url=nats) as js:
        async def main() -> None:
            with trio.fail_after(CASE_TIMEOUT):
                await case(js)

        trio.run(main)
