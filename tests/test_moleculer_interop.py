"""A nerve node and a real moleculer.js 0.15 node in one cluster over a real NATS server:
discovery, calls both ways (nested, meta merged back), errors, events."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import trio

import nerve
from nerve.errors import ClientError

from nats_server import ensure_nats

ROOT = Path(__file__).resolve().parent.parent
JS_DIR = ROOT / "benches" / "peers" / "js"
NODE_SCRIPT = Path(__file__).with_name("interop") / "moleculer_node.js"
@pytest.fixture(scope="module")
def nats() -> str:
    """The machine's NATS server, started (with the command of DESIGN section 5) if it is down."""
    return ensure_nats()


@pytest.fixture(scope="module")
def moleculer_js() -> Path:
    """moleculer.js 0.15 from the lock file (npm ci when it is not installed yet)."""
    if not (JS_DIR / "node_modules" / "moleculer").is_dir():
        npm = shutil.which("npm")
        assert npm, "npm is needed for the moleculer.js interop tests"
        subprocess.run([npm, "ci", "--prefix", str(JS_DIR), "--no-audit", "--no-fund", "--loglevel=error"],
                       check=True, timeout=300)
    return JS_DIR / "node_modules"


@pytest.fixture
def js_node(nats: str, moleculer_js: Path) -> Iterator[tuple[str, str]]:
    namespace = f"nervetest{os.getpid()}{time.monotonic_ns() % 100000}"
    env = dict(os.environ, NODE_PATH=str(moleculer_js))
    proc = subprocess.Popen(["node", str(NODE_SCRIPT), "js-node", namespace], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert json.loads(line) == {"ready": True}
    try:
        yield "js-node", namespace
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


class MulParams(msgspec.Struct):
    a: int
    b: int


class PyMath(nerve.Service):
    name = "pymath"

    @nerve.action
    async def mul(self, ctx: nerve.Context, params: MulParams) -> int:
        ctx.meta["py"] = "was here too"
        return params.a * params.b

    @nerve.action
    async def fail(self, ctx: nerve.Context) -> None:
        raise ClientError("python says no", 409, "PY_NO", {"detail": 1})


def test_nerve_and_moleculer_js_in_one_cluster(nats: str, js_node: tuple[str, str]) -> None:
    js_id, namespace = js_node

    async def main() -> None:
        async with nerve.Broker("py-node", transport=nats, namespace=namespace, serializer="json",
                                services=[PyMath()], heartbeat_interval=1, heartbeat_timeout=3) as b:
            with trio.fail_after(20):
                await b.wait_for_services("jsmath")
            # nerve -> moleculer.js, meta merged back
            meta: dict[str, object] = {"from": "python"}
            assert await b.call("jsmath.add", {"a": 1, "b": 2}, meta=meta) == 3
            assert meta == {"from": "python", "js": "was here"}
            # moleculer.js -> nerve, nested: JS calls pymath.mul, whose meta travels back
            out = await b.call("jsmath.viaPython", {"a": 6, "b": 7})
            assert out["product"] == 42
            assert out["meta"]["py"] == "was here too" and out["meta"]["asked"] == "js"
            # errors cross the wire intact, both ways
            with pytest.raises(ClientError) as info:
                await b.call("jsmath.fail", {"why": "test"})
            err = info.value
            assert (err.name, err.code, err.type, err.data) == ("MoleculerClientError", 422, "JS_NO", {"why": "test"})
            assert err.node_id == js_id and "js says no" in (err.stack or "")
            seen_by_js = await b.call("jsmath.pythonError")
            assert seen_by_js == {"name": "MoleculerClientError", "code": 409, "type": "PY_NO",
                                  "data": {"detail": 1}, "message": "python says no"}
            # events: nerve emits, the JS handler receives
            await b.emit("py.hello", {"n": 1})
            with trio.fail_after(5):
                while not await b.call("jsmath.events"):
                    await trio.sleep(0.05)
            assert await b.call("jsmath.events") == [{"n": 1}]
            # the JS node sees us in its registry
            nodes = await b.call("$node.list", node_id=js_id)
            assert {n["id"] for n in nodes if n.get("available")} >= {"py-node", js_id}

    trio.run(main)


class PyTrace(nerve.Service):
    name = "pytrace"

    @nerve.action
    async def where(self, ctx: nerve.Context) -> dict[str, object]:
        return {"requestID": ctx.request_id, "parentID": ctx.parent_id, "headers": dict(ctx.headers)}


def test_tracing_takes_a_moleculer_js_callers_ids_as_the_parent(js_node: tuple[str, str]) -> None:
    """moleculer.js sends no traceparent: nerve's SERVER span joins the trace its requestID
    names, under the calling context (parentID); nerve's own calls carry a traceparent header
    that moleculer.js receives (its tracer does not read it)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from nerve.tracing import Tracing

    js_id, namespace = js_node
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def main() -> None:
        async with nerve.Broker("py-traced", transport="nats://127.0.0.1:4222", namespace=namespace,
                                serializer="json", services=[PyTrace()], heartbeat_interval=1,
                                heartbeat_timeout=3, middlewares=[Tracing(tracer_provider=provider)]) as b:
            with trio.fail_after(20):
                await b.wait_for_services("jstrace")
            out = await b.call("jstrace.kick")
            where = out["where"]
            assert where["requestID"] == out["requestID"] and where["parentID"] == out["id"]
            assert "traceparent" not in where["headers"]
            served = [s for s in exporter.get_finished_spans() if s.name == "pytrace/where"]
            assert len(served) == 1 and served[0].kind is SpanKind.SERVER
            span = served[0]
            assert span.context is not None and span.parent is not None and span.parent.is_remote
            assert span.context.trace_id == int(out["requestID"].replace("-", ""), 16)
            assert span.parent.span_id == int(out["id"].replace("-", "")[:16], 16)

            headers = await b.call("jstrace.headers")
            client = [s for s in exporter.get_finished_spans() if s.name == "jstrace/headers"]
            assert len(client) == 1 and client[0].context is not None
            assert headers["traceparent"].split("-")[1:3] == [f"{client[0].context.trace_id:032x}",
                                                             f"{client[0].context.span_id:016x}"]

    trio.run(main)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_nodes_reconnect_after_the_nats_server_restarts(tmp_path: Path) -> None:
    """A private nats-server (not the machine's): killed and restarted on the same port."""
    port = _free_port()
    url = f"nats://127.0.0.1:{port}"

    def start_server() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["/usr/sbin/nats-server", "-a", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return proc
            except OSError:
                assert time.monotonic() < deadline, "private nats-server did not start"
                time.sleep(0.05)

    server = start_server()
    try:
        async def main() -> None:
            nonlocal server
            kw = dict(transport=url, heartbeat_interval=0.3, heartbeat_timeout=1.5)
            async with nerve.Broker("nr-a", services=[PyMath()], **kw), nerve.Broker("nr-b", **kw) as b:
                await b.wait_for_services("pymath")
                assert await b.call("pymath.mul", {"a": 2, "b": 3}) == 6
                server.kill()
                server.wait()
                await trio.sleep(0.5)
                server = await trio.to_thread.run_sync(start_server)
                with trio.fail_after(15):
                    while True:
                        try:
                            if await b.call("pymath.mul", {"a": 4, "b": 5}, timeout=1) == 20:
                                break
                        except nerve.errors.NerveError:
                            await trio.sleep(0.2)

        trio.run(main)
    finally:
        server.kill()
        server.wait()
