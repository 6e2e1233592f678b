"""Metrics (nerve.metrics), statistics (nerve.statistics) and the metrics port, with real parts:
brokers over TCP on loopback, three node processes, a real HTTP client (httpx)."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import nerve
from nerve.errors import BrokerOptionsError, NerveError, ValidationError
from nerve.metrics import Metrics, parse_listen

pytestmark = pytest.mark.anyio

NODE = str(Path(__file__).resolve().parent / "metrics_node.py")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by (name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(table: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sample ``name`` whose labels include ``labels`` (exactly one must match)."""
    found = [v for (n, ls), v in table.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def total(table: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in table.items() if n == name and set(labels.items()) <= ls)


async def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await trio.to_thread.run_sync(lambda: httpx.get(url, timeout=10))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return samples(response.text)


class Math(nerve.Service):
    name = "math"

    def __init__(self) -> None:
        self.seen = 0

    @nerve.action
    async def add(self, ctx: nerve.Context) -> int:
        return int(ctx.params["a"]) + int(ctx.params["b"])

    @nerve.action
    async def boom(self, ctx: nerve.Context) -> None:
        raise RuntimeError(f"boom {ctx.params.get('n')}")

    @nerve.action
    async def refuse(self, ctx: nerve.Context) -> None:
        raise ValidationError("no", data={"field": "x"})

    @nerve.action
    async def odd(self, ctx: nerve.Context) -> None:
        raise NerveError("odd", code=500, type=f"KIND_{ctx.params['n']}")

    @nerve.action
    async def count(self, ctx: nerve.Context) -> int:
        assert ctx.stream is not None
        return len(await ctx.stream.read_all())

    @nerve.event("math.done")
    async def done(self, ctx: nerve.Context) -> None:
        self.seen += 1


# --- options -------------------------------------------------------------------------------


def test_parse_listen() -> None:
    assert parse_listen(9464) == ("", 9464)
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen(":9") == ("", 9)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    assert parse_listen("http://localhost:80/") == ("localhost", 80)
    for bad in ("x", "1.2.3.4:99999", "[::1", "[::1]9", "", True, 1.5, None, "h:-1"):
        with pytest.raises(BrokerOptionsError):
            parse_listen(bad)  # type: ignore[arg-type]


def test_bad_metrics_port_is_refused_at_creation() -> None:
    with pytest.raises(BrokerOptionsError, match="metrics address"):
        nerve.Broker("m-bad", metrics_port="localhost:http")


def test_a_metrics_instance_belongs_to_one_broker() -> None:
    m = Metrics()
    nerve.Broker("m-one", metrics=m)
    with pytest.raises(BrokerOptionsError, match="one broker"):
        nerve.Broker("m-two", metrics=m)


async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerOptionsError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            async with nerve.Broker("m-busy", metrics_port=f"127.0.0.1:{port}"):
                pass


# --- exact counters, two brokers over TCP ---------------------------------------------------


async def test_counters_are_exact_after_a_known_workload() -> None:
    math = Math()
    async with nerve.Broker("m-srv", transport="tcp://127.0.0.1:0", services=[math], metrics=True) as srv:
        async with nerve.Broker("m-cli", transport="tcp://127.0.0.1:0", peers=[srv.address],
                                metrics=True) as cli:
            await cli.wait_for_services("math", timeout=10)
            for i in range(7):
                assert await cli.call("math.add", {"a": i, "b": 1}) == i + 1
            for i in range(3):
                with pytest.raises(NerveError):
                    await cli.call("math.boom", {"n": i})
            for _ in range(2):
                with pytest.raises(ValidationError):
                    await cli.call("math.refuse")
            assert await srv.call("math.add", {"a": 1, "b": 1}) == 2  # a local call
            for _ in range(4):
                await cli.emit("math.done", {})
            await cli.broadcast("math.done", {})
            stream = nerve.PacketStream()

            async def produce() -> None:
                await stream.send(b"x" * 300_000)
                await stream.close()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                assert await cli.call("math.count", stream=stream) == 300_000
            with trio.fail_after(5):
                while math.seen < 5:
                    await trio.sleep(0.01)

            s = samples(srv.metrics.exposition().decode())
            c = samples(cli.metrics.exposition().decode())

    local = {"service": "math", "type": "local"}
    assert value(s, "moleculer_request_total", action="math.add", **local) == 8
    assert value(s, "moleculer_request_total", action="math.boom", **local) == 3
    assert value(s, "moleculer_request_error_total", action="math.boom", errorName="RuntimeError", **local) == 3
    assert value(s, "moleculer_request_error_total", action="math.refuse", errorName="ValidationError",
                 errorCode="422", **local) == 2
    assert total(s, "moleculer_request_error_total", action="math.add") == 0
    assert value(s, "moleculer_request_time_seconds_count", action="math.add", **local) == 8
    assert value(s, "moleculer_request_time_seconds_bucket", action="math.add", le="+Inf", **local) == 8
    assert value(s, "moleculer_request_active", action="math.add", **local) == 0
    remote = {"service": "math", "type": "remote"}
    assert value(c, "moleculer_request_total", action="math.add", **remote) == 7
    assert value(c, "moleculer_request_error_total", action="math.boom", **remote) == 3
    assert value(c, "moleculer_request_time_seconds_count", action="math.refuse", **remote) == 2
    assert value(c, "moleculer_event_emit_total", event="math.done") == 4
    assert value(c, "moleculer_event_broadcast_total", event="math.done") == 1
    assert value(s, "moleculer_event_received_total", event="math.done", service="math", group="math") == 5
    assert value(c, "nerve_stream_sent_bytes_total") == 300_000
    assert value(s, "nerve_stream_received_bytes_total") == 300_000
    assert value(c, "nerve_stream_opened_total") == 1
    assert value(c, "nerve_calls_total") == 13 and value(c, "nerve_calls_failed_total") == 5
    assert value(s, "moleculer_transporter_packets_received_bytes_total") > 300_000
    assert value(c, "moleculer_transporter_packets_sent_bytes_total") > 300_000
    assert value(s, "moleculer_registry_nodes_total") == 2
    assert value(s, "moleculer_registry_actions_total") >= 6  # math's and $node's
    assert value(s, "process_resident_memory_bytes") > 0


async def test_statistics_are_frozen_snapshots_and_exact() -> None:
    math = Math()
    async with nerve.Broker("st-srv", transport="tcp://127.0.0.1:0", services=[math]) as srv:
        async with nerve.Broker("st-cli", transport="tcp://127.0.0.1:0", peers=[srv.address]) as cli:
            await cli.wait_for_services("math", timeout=10)
            before = srv.statistics()
            for i in range(3):
                await cli.call("math.add", {"a": i, "b": i})
            with pytest.raises(NerveError):
                await cli.call("math.boom", {"n": 1})
            await srv.call("math.add", {"a": 1, "b": 2})
            with pytest.raises(NerveError):
                await cli.call("nope.nothing", timeout=0.2)
            await cli.emit("math.done")
            with trio.fail_after(5):
                while math.seen < 1:
                    await trio.sleep(0.01)
            after = srv.statistics()
            client = cli.statistics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.calls = 0  # type: ignore[misc]
    assert after.requests_served - before.requests_served == 5  # 4 remote + 1 local
    assert after.requests_failed - before.requests_failed == 1
    assert after.calls - before.calls == 1  # the local one
    assert after.transit.requests_received - before.transit.requests_received == 4
    assert after.transit.events_received == 1 and after.events_handled == 1
    assert client.calls == 5 and client.calls_failed == 2  # math.boom and the unknown action
    assert client.transit.requests_sent == 4  # the unknown action was never sent
    assert client.events_emitted == 1
    assert after.running and after.uptime > 0 and after.node_id == "st-srv"
    assert after.transport.connections == 1 and after.transport.bytes_received > 0
    assert after.registry.nodes == 2 and after.handler_pool.active == 0
    assert before.transit.requests_received == after.transit.requests_received - 4  # taken before: unmoved


async def test_error_label_sets_are_bounded() -> None:
    async with nerve.Broker("m-card", services=[Math()], metrics=True) as b:
        for n in range(50):
            with pytest.raises(NerveError):
                await b.call("math.odd", {"n": n})
        s = samples(b.metrics.exposition().decode())
    errors = {ls for (n, ls), _ in s.items() if n == "moleculer_request_error_total"}
    assert len(errors) == 32 + 1  # 32 kinds, then "other"
    assert value(s, "moleculer_request_error_total", action="math.odd", errorName="other") == 50 - 32


# --- the metrics port -----------------------------------------------------------------------


async def raw(address: tuple[str, int], data: bytes, *, read: bool = True) -> bytes:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(data)
        if not read:
            return b""
        out = b""
        with trio.fail_after(15):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                out += chunk
        return out


async def test_metrics_port_survives_hostile_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    import nerve.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "HEAD_TIMEOUT", 0.5)
    async with nerve.Broker("m-port", services=[Math()], metrics_port="127.0.0.1:0") as b:
        assert b.metrics.url is not None
        host, port = b.metrics.url.removeprefix("http://").removesuffix("/metrics").rsplit(":", 1)
        addr = (host, int(port))
        assert (await raw(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")
        head = await raw(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        assert (await raw(addr, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await raw(addr, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await raw(addr, b"\x00\xff\xfe garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert (await raw(addr, b"GET /m\xc3\x28trics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await raw(addr, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 40_000 + b"\r\n\r\n")
                ).startswith(b"HTTP/1.1 431")
        assert (await raw(addr, b"GET /metrics HTTP/1.1\r\n")).startswith(b"HTTP/1.1 408")  # never ends its head
        assert (await raw(addr, b"")).startswith(b"HTTP/1.1 408")  # says nothing: closed after the timeout
        # one host holds at most MAX_PER_HOST connections: the rest are closed at once
        streams = [await trio.open_tcp_stream(*addr) for _ in range(metrics_module.MAX_PER_HOST + 4)]
        try:
            refused = 0
            for s in streams[metrics_module.MAX_PER_HOST:]:
                with trio.fail_after(5):
                    try:
                        refused += await s.receive_some(10) == b""
                    except trio.BrokenResourceError:
                        refused += 1
            assert refused == 4
        finally:
            for s in streams:
                await s.aclose()
        assert await b.call("math.add", {"a": 2, "b": 2}) == 4
        s = await scrape(b.metrics.url)
        assert value(s, "moleculer_request_total", action="math.add", type="local") == 1
    assert b.metrics.url is None


# --- three processes ------------------------------------------------------------------------


def spawn(role: str, *peers: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    args = [sys.executable, NODE, "--role", role]
    for p in peers:
        args += ["--peer", p]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"node {role} did not start"
    return proc, json.loads(line)


@pytest.fixture
def cluster() -> Iterator[dict[str, dict[str, Any]]]:
    procs = []
    try:
        pb, b = spawn("b")
        procs.append(pb)
        pc, c = spawn("c", b["address"])
        procs.append(pc)
        pa, a = spawn("a", b["address"], c["address"])
        procs.append(pa)
        yield {"a": a, "b": b, "c": c}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            assert p.wait(15) == 0


async def test_three_process_cluster_serves_exact_metrics(cluster: dict[str, dict[str, Any]]) -> None:
    runs, size = 5, 200_000
    async with nerve.Broker("m-driver", transport="tcp://127.0.0.1:0", peers=[cluster["a"]["address"]]) as d:
        await d.wait_for_services("a", "b", "c", timeout=15)
        for _ in range(runs):
            out = await d.call("a.work", {"size": size}, timeout=10)
            assert out["failed"] == "NerveError" and out["sunk"] == size
        a = await scrape(cluster["a"]["metrics"])
        # events are served in the background: wait for the last handler to finish
        with trio.fail_after(10):
            while True:
                b = await scrape(cluster["b"]["metrics"])
                c = await scrape(cluster["c"]["metrics"])
                if total(b, "moleculer_event_received_time_seconds_count") == runs == total(
                        c, "moleculer_event_received_time_seconds_count"):
                    break
                await trio.sleep(0.05)
    assert value(a, "moleculer_request_total", action="a.work", type="local") == runs
    assert value(a, "moleculer_request_total", action="b.echo", type="remote") == runs
    assert value(a, "moleculer_request_total", action="c.fail", type="remote") == runs
    assert value(a, "moleculer_request_error_total", action="c.fail", type="remote",
                 errorName="MoleculerError", errorCode="500", errorType="ALWAYS") == runs  # the wire name
    assert value(a, "moleculer_request_total", action="c.sink", type="remote") == runs
    assert value(a, "moleculer_event_emit_total", event="thing.happened") == runs
    assert value(a, "nerve_stream_sent_bytes_total") == runs * size
    assert value(b, "moleculer_request_total", action="b.echo", type="local") == runs
    assert total(b, "moleculer_request_error_total") == 0
    assert value(b, "moleculer_event_received_total", event="thing.happened", service="b") == runs
    assert value(c, "moleculer_request_total", action="c.fail", type="local") == runs
    assert value(c, "moleculer_request_error_total", action="c.fail", type="local", errorName="MoleculerError") == runs
    assert value(c, "moleculer_request_total", action="c.sink", type="local") == runs
    assert value(c, "nerve_stream_received_bytes_total") == runs * size
    assert value(c, "moleculer_event_received_total", event="thing.happened", service="c") == runs
    assert value(c, "moleculer_transporter_packets_received_bytes_total") > runs * size
    for node in (a, b, c):
        assert value(node, "moleculer_registry_nodes_online_total") == 4  # a, b, c and the driver
        assert value(node, "moleculer_broker_started") == 1


# --- logs ---------------------------------------------------------------------------------


async def test_handler_exceptions_are_logged_once_on_the_serving_node(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="nerve")
    async with nerve.Broker("log-srv", transport="tcp://127.0.0.1:0", services=[Math()]) as srv:
        async with nerve.Broker("log-cli", transport="tcp://127.0.0.1:0", peers=[srv.address]) as cli:
            await cli.wait_for_services("math", timeout=10)
            caplog.clear()
            with pytest.raises(NerveError):
                await cli.call("math.boom", {"n": 7})
            with pytest.raises(ValidationError):
                await cli.call("math.refuse")
            with pytest.raises(RuntimeError):
                await srv.call("math.boom", {"n": 8})  # a local call: logged there too, once
    failures = [r for r in caplog.records if r.getMessage().startswith("action 'math.")]
    boom = [r for r in failures if r.levelno == logging.ERROR]
    assert len(boom) == 2, [r.getMessage() for r in failures]
    remote = boom[0]
    assert remote.node_id == "log-srv" and remote.action == "math.boom"  # type: ignore[attr-defined]
    assert remote.caller_node == "log-cli" and remote.service == "math"  # type: ignore[attr-defined]
    assert remote.request_id and remote.exc_info and "boom 7" in str(remote.exc_info[1])  # type: ignore[attr-defined]
    assert "log-cli" in remote.getMessage()
    assert boom[1].caller_node == "log-srv" and "boom 8" in str(boom[1].exc_info[1])  # type: ignore[attr-defined, index]
    refused = [r for r in failures if "math.refuse" in r.getMessage()]
    assert [r.levelno for r in refused] == [logging.DEBUG]  # a 4xx is the caller's business
    assert not [r for r in caplog.records if r.name == "nerve.broker" and "log-cli" == getattr(r, "node_id", None)
                and r.levelno >= logging.WARNING]  # nothing logged on the calling node


async def test_lifecycle_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nerve")
    caplog.set_level(logging.DEBUG, logger="nerve.tcp")
    async with nerve.Broker("life-a", transport="tcp://127.0.0.1:0", services=[Math()]) as a:
        async with nerve.Broker("life-b", transport="tcp://127.0.0.1:0", peers=[a.address]):
            await a.wait_for_services("$node", timeout=5)
            with trio.fail_after(5):
                while "life-b" not in a.registry.nodes:
                    await trio.sleep(0.01)
        with trio.fail_after(5):
            while a.registry.nodes["life-b"].available:
                await trio.sleep(0.01)
    mine = [r for r in caplog.records if getattr(r, "node_id", None) == "life-a" and r.levelno == logging.INFO]
    text = [r.getMessage() for r in mine]
    assert any(t.startswith("node life-a started: tcp://127.0.0.1:") and "math" in t for t in text), text
    assert any(t == "node life-b connected" for t in text), text
    assert any(t.startswith("node life-b disconnected") for t in text), text
    assert text[-1] == "node life-a stopped", text
    peer = next(r for r in mine if r.getMessage() == "node life-b connected")
    assert peer.peer == "life-b"  # type: ignore[attr-defined]
    tcp = [r for r in caplog.records if r.name == "nerve.tcp"]
    assert tcp and {getattr(r, "node_id", None) for r in tcp} <= {"life-a", "life-b"}, tcp


async def test_asgi_app_serves_the_exposition() -> None:
    """For an ASGI server (the gateway's /metrics): the same families, built per request."""
    async with nerve.Broker("m-asgi", services=[Math()], metrics=Metrics(process=False)) as b:
        assert await b.call("math.add", {"a": 1, "b": 1}) == 2
        transport = httpx.ASGITransport(app=b.metrics.asgi_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            response = await client.get("/metrics")
        assert response.status_code == 200
        s = samples(response.text)
        assert value(s, "moleculer_request_total", action="math.add", type="local") == 1
        assert not [n for n, _ in s if n.startswith("process_")]  # process=False


async def test_silent_connections_cannot_keep_a_scraper_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every slot held by clients that connect and say nothing: a scraper still gets its
    metrics (it replaces the oldest silent connection)."""
    import nerve.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "MAX_PER_HOST", 100)  # every client is on 127.0.0.1 here
    async with nerve.Broker("m-starve", services=[Math()], metrics_port="127.0.0.1:0") as b:
        assert b.metrics.url is not None
        host, port = b.metrics.url.removeprefix("http://").removesuffix("/metrics").rsplit(":", 1)
        silent = [await trio.open_tcp_stream(host, int(port)) for _ in range(metrics_module.MAX_CONNECTIONS)]
        try:
            await trio.sleep(0.2)  # all of them accepted and waiting for a head
            for _ in range(3):
                with trio.fail_after(10):
                    s = await scrape(b.metrics.url)
                assert value(s, "moleculer_broker_started") == 1
        finally:
            for stream in silent:
                await stream.aclose()
        assert await b.call("math.add", {"a": 1, "b": 2}) == 3


async def test_a_collector_that_raises_is_a_500_not_the_end_of_the_node() -> None:
    from prometheus_client import Gauge

    async with nerve.Broker("m-raise", services=[Math()], metrics_port="127.0.0.1:0") as b:
        Gauge("app_broken", "raises when read", registry=b.metrics.registry).set_function(
            lambda: {}["missing"])  # type: ignore[misc]
        assert b.metrics.url is not None
        response = await trio.to_thread.run_sync(lambda: httpx.get(b.metrics.url, timeout=10))
        assert response.status_code == 500
        assert await b.call("math.add", {"a": 1, "b": 2}) == 3  # the node is fine


async def test_remote_labels_come_from_the_called_name_not_a_peers_info(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that re-announces an action under new service names (or many actions) cannot
    grow this node's label sets: remote slots are keyed by the name this node called, and
    bounded."""
    import nerve._metering as metering

    async with nerve.Broker("m-lab", services=[Math()], metrics=True) as b:
        meter = b.metrics.meter
        for service in ("x", "y", "z" * 5000):
            meter.remote_slot("users.get").total += 1  # what the transit does per REQ
            del service
        assert list(meter.remote) == [("users", "users.get")]
        monkeypatch.setattr(metering, "MAX_SLOTS", 3)
        for i in range(10):
            meter.remote_slot(f"a{i}.b" + "q" * 1000).total += 1
        assert len(meter.remote) <= 3 + 1 and meter.remote[("other", "other")].total == 10 - 2
        assert all(len(action) <= metering.MAX_LABEL for _, action in meter.remote)
        for i in range(10):
            meter.count_emit(f"e{i}", False)
        assert len(meter.emitted) <= 3 + 1 and meter.emitted["other"] == 10 - 3


class Serving(nerve.Service):
    name = "serving"

    @nerve.action
    async def outer(self, ctx: nerve.Context) -> Any:
        return await ctx.call("serving.inner")

    @nerve.action
    async def inner(self, ctx: nerve.Context) -> Any:
        raise ValueError("deep")

    @nerve.action
    async def unserializable(self, ctx: nerve.Context) -> Any:
        return {"when": object()}


async def test_failures_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A nested local call's exception is logged once (not once per level); a result that
    cannot be serialized is the handler's failure: counted and logged; a peer's strings are
    cut and quoted in the message."""
    caplog.set_level(logging.DEBUG, logger="nerve")
    async with nerve.Broker("once-srv", transport="tcp://127.0.0.1:0", services=[Serving()], metrics=True) as srv:
        async with nerve.Broker("once-cli", transport="tcp://127.0.0.1:0", peers=[srv.address]) as cli:
            await cli.wait_for_services("serving", timeout=10)
            with pytest.raises(NerveError):
                await cli.call("serving.outer")
            with pytest.raises(NerveError) as err:
                await cli.call("serving.unserializable")
            assert type(err.value).__name__ == "SerializationError"
            parent = nerve.Context(cli, id="p", request_id="r\nFORGED " + "x" * 10_000)
            parent.service = "evil\nCRITICAL forged line"
            with pytest.raises(NerveError):
                await cli.call("serving.inner", parent_ctx=parent)
            stats = srv.statistics()
            s = samples(srv.metrics.exposition().decode())
    deep = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info and "deep" in str(r.exc_info[1])]
    assert len(deep) == 2, [r.getMessage() for r in deep]  # one per failing request, not per level
    unser = [r for r in caplog.records if "serving.unserializable" in r.getMessage()]
    assert len(unser) == 1 and unser[0].levelno == logging.WARNING
    assert stats.requests_failed == 2 + 1 + 1  # outer, inner (local), unserializable, inner (forged)
    assert value(s, "moleculer_request_error_total", action="serving.unserializable", type="local") == 1
    forged = deep[1]
    assert "\n" not in forged.getMessage() and len(forged.getMessage()) < 600
    assert len(forged.request_id) <= 140  # type: ignore[attr-defined]


class Sinks(nerve.Service):
    name = "sinks"

    @nerve.action
    async def slow(self, ctx: nerve.Context) -> int:
        assert ctx.stream is not None
        n = len(await ctx.stream.read_all())
        await trio.sleep(5)
        return n

    @nerve.action
    async def reads(self, ctx: nerve.Context) -> int:
        assert ctx.stream is not None
        return len(await ctx.stream.read_all())


async def test_stream_calls_cut_by_their_caller(caplog: pytest.LogCaptureFixture) -> None:
    """A stream call that times out is labelled RequestTimeoutError (as a plain call is); one
    whose caller gives up mid-stream is a cancellation on the serving node, not a failure."""
    caplog.set_level(logging.WARNING, logger="nerve")
    async with nerve.Broker("cut-srv", transport="tcp://127.0.0.1:0", services=[Sinks()], metrics=True) as srv:
        async with nerve.Broker("cut-cli", transport="tcp://127.0.0.1:0", peers=[srv.address],
                                metrics=True) as cli:
            await cli.wait_for_services("sinks", timeout=10)
            done = nerve.PacketStream()

            async def finish() -> None:
                await done.send(b"a" * 1000)
                await done.close()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(finish)
                with pytest.raises(nerve.errors.RequestTimeoutError):
                    await cli.call("sinks.slow", stream=done, timeout=0.2)
            endless = nerve.PacketStream()

            async def trickle() -> None:
                while True:
                    await endless.send(b"b" * 100)
                    await trio.sleep(0.01)

            with trio.move_on_after(0.3):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trickle)
                    await cli.call("sinks.reads", stream=endless)
            with trio.fail_after(5):
                while srv.statistics().transit.requests_in_service:
                    await trio.sleep(0.01)
            c = samples(cli.metrics.exposition().decode())
            stats = srv.statistics()
    assert value(c, "moleculer_request_error_total", action="sinks.slow", type="remote") == 1
    assert value(c, "moleculer_request_error_total", action="sinks.slow", type="remote",
                 errorName="RequestTimeoutError") == 1
    assert value(c, "moleculer_request_error_total", action="sinks.reads", type="remote", errorName="Cancelled") == 1
    assert stats.requests_failed == 0  # both were cut short by their caller
    assert not [r for r in caplog.records if "sinks." in r.getMessage()]
