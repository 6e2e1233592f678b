"""nerve's side of every benchmark: a server broker and a client broker over nerve's TCP
transport (one connection between the two nodes) or over NATS, plus the in-process call cost.

    python benches/peers/nerve_peer.py server --port P
    python benches/peers/nerve_peer.py client --port P --scenario rpc --inflight 64 ...
    python benches/peers/nerve_peer.py server --transport nats --namespace NS --serializer msgpack
    python benches/peers/nerve_peer.py client --transport nats --namespace NS --actions file ...
    python benches/peers/nerve_peer.py client --scenario inproc --count N
    python benches/peers/nerve_peer.py server --middlewares 3mw --probe   # can this nerve run it?

``--transport nats`` puts both brokers on the NATS server ``--nats`` in the namespace the
harness makes for the run (``--namespace``, as for the moleculer.js NATS peers), with
``--serializer``. The server serves the stream actions twice: ``storage.upload`` /
``storage.download`` (what this client calls) and ``file.save`` / ``file.get`` (what
``js/client.js`` calls and ``js/server.js`` serves), so either side can face moleculer.js;
``--actions file`` makes this client call the latter. A moleculer.js producer has no flow
control: when it gets more than ``max_stream_buffer`` ahead of this client, nerve fails the
stream with ``StreamOverflowError``; the client then reports that (``stream_error``, with the
bytes it had read) instead of failing, and the harness decides whether it is an outcome.

``--middlewares`` picks the variant: ``none`` (plain nerve), ``3mw`` (three do-nothing
middlewares on both brokers: each wraps ``call``, ``local_action`` and ``remote_action`` and just
awaits ``next``), ``ft`` (the client with ``nerve.middlewares.CircuitBreaker()``, the server with
``nerve.middlewares.Bulkhead(concurrency=128, max_queue_size=128)``: sized above the
harness's 64 in flight, so the figure is their cost, not the queueing a smaller bulkhead adds),
``metrics`` (``metrics=True`` on both brokers: nerve's inline counting), ``tracing``
(``nerve.tracing.Tracing`` on both brokers with the OpenTelemetry SDK: a ``TracerProvider``
whose ``BatchSpanProcessor`` hands the spans to an exporter that drops them, so the figure is
nerve's spans plus the SDK's recording, not an exporter's I/O) and ``otel-nosdk``
(``Tracing()`` on both brokers with the API only, no provider set: nothing should be wrapped).
A nerve without that API (an older revision) makes ``--probe`` print the reason, which the
harness reports as the variant skipped.

The metrics and tracing variants serve one more action, ``benchreport.report``, which the
client calls once after the measured part (outside the marks): the server scrapes its
metrics (``broker.metrics.exposition()``) and flushes its spans there, and the client checks
that what was counted or traced matches the calls it made (a variant that silently did
nothing fails its run) and adds the figures to its result (``variant``).

The ``file`` scenarios move a real file (``--file``, made by the harness, its SHA-256 in
``--sha256``) into ``--dir``: ``file_upload`` calls the server's ``disk.put`` with
``stream=PacketStream.from_file(src)``, whose handler does ``await ctx.stream.transfer_to(dest)``
(a temporary file beside ``dest``, fsynced, renamed over it) and returns the byte count;
``file_download`` calls ``disk.get``, which returns ``PacketStream.from_file(src)``, and the
client does ``await stream.transfer_to(dest)``. The measured part is that one call (and, for the
download, the ``transfer_to``). Afterwards, outside the marks, the destination's size and SHA-256
are checked (``disk.done`` on the server, which then deletes it; the client's own for a
download), so a broken transfer fails its run instead of looking fast.

``rpc_under_transfer`` keeps ``--inflight`` calls of ``echo.echo`` in flight on the one
connection for ``--duration`` seconds with no transfer, then again while ``storage.upload``
receives ``--size`` bytes from memory on the same connection, and reports the latency
percentiles (p50, p99, p99.9) and calls/s of both phases and the transfer's MB/s.

Servers (in their READY line) and clients (in their result) report ``nerve.__file__``: the
harness checks that a baseline peer imported the revision it asked for.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nerve  # noqa: E402
import nerve.errors  # noqa: E402
import trio  # noqa: E402
from _trio_rpc import measure_rpc  # noqa: E402
from _common import (  # noqa: E402
    PARAMS,
    Pacer,
    arm_deadline,
    chunk_source,
    idle_and_wait,
    mark,
    parser,
    ready,
    result,
)


async def _chunks(size: int, chunk: int) -> AsyncIterator[bytes]:
    block, full, rest = chunk_source(size, chunk)
    for _ in range(full):
        yield block
    if rest:
        yield block[:rest]


class Echo(nerve.Service):
    name = "echo"

    @nerve.action
    async def echo(self, ctx: nerve.Context) -> Any:
        return ctx.params


class Counter(nerve.Service):
    name = "counter"
    received = 0

    @nerve.event("bench.tick")
    async def tick(self, ctx: nerve.Context) -> None:
        Counter.received += 1

    @nerve.action
    async def count(self, ctx: nerve.Context) -> int:
        return Counter.received


async def _count(ctx: nerve.Context) -> int:
    """Read the request stream to its end: the bytes received."""
    assert ctx.stream is not None
    n = 0
    async for chunk in ctx.stream:
        n += len(chunk)
    return n


def _produce(ctx: nerve.Context) -> nerve.PacketStream:
    """The response stream of ``{size, chunk}``: data from memory."""
    p = ctx.params
    return nerve.PacketStream.from_iterable(_chunks(int(p["size"]), int(p["chunk"])))


class Storage(nerve.Service):
    name = "storage"

    @nerve.action
    async def upload(self, ctx: nerve.Context) -> int:
        return await _count(ctx)

    @nerve.action
    async def download(self, ctx: nerve.Context) -> nerve.PacketStream:
        return _produce(ctx)


class File(nerve.Service):
    """The same actions under the names of js/server.js, which js/client.js calls."""

    name = "file"

    @nerve.action
    async def save(self, ctx: nerve.Context) -> int:
        return await _count(ctx)

    @nerve.action
    async def get(self, ctx: nerve.Context) -> nerve.PacketStream:
        return _produce(ctx)


def _finish_file(dest: Path, want_sha256: bool) -> dict[str, Any]:
    """A transferred file's size and SHA-256 (when asked), then delete it (blocking: run it in a
    thread)."""
    try:
        out: dict[str, Any] = {"size": dest.stat().st_size}
        if want_sha256:
            h = hashlib.sha256()
            with open(dest, "rb") as f:
                for block in iter(lambda: f.read(1024 * 1024), b""):
                    h.update(block)
            out["sha256"] = h.hexdigest()
        return out
    finally:
        dest.unlink(missing_ok=True)


class Disk(nerve.Service):
    """File to file (the ``file`` scenarios): the destinations are paths the client names (both
    processes are on this machine, in the harness's temporary directory)."""

    name = "disk"

    @nerve.action
    async def put(self, ctx: nerve.Context) -> int:
        """Write the request stream to ``dest`` (fsynced and renamed by transfer_to)."""
        assert ctx.stream is not None
        return await ctx.stream.transfer_to(Path(ctx.params["dest"]))

    @nerve.action
    async def get(self, ctx: nerve.Context) -> nerve.PacketStream:
        """The file at ``path`` as the response stream."""
        return nerve.PacketStream.from_file(ctx.params["path"])

    @nerve.action
    async def done(self, ctx: nerve.Context) -> dict[str, Any]:
        """``dest``'s size and SHA-256 (``sha256``: true), then delete it."""
        return await trio.to_thread.run_sync(_finish_file, Path(ctx.params["dest"]),
                                             bool(ctx.params.get("sha256")))


#: the service and stream actions a client calls, by ``--actions``
ACTIONS = {"storage": ("storage", "storage.upload", "storage.download"),
           "file": ("file", "file.save", "file.get")}
#: what a producer without flow control (moleculer.js) ahead of this reader raises; None in
#: a nerve without it (an older revision)
StreamOverflowError: type[Exception] | None = getattr(nerve.errors, "StreamOverflowError", None)


class Unsupported(Exception):
    """This nerve lacks what a variant needs (the message says what)."""


VARIANTS = ["none", "3mw", "ft", "metrics", "tracing", "otel-nosdk"]
#: the variants whose server serves ``benchreport.report`` (see the module's docstring)
REPORTING = ("metrics", "tracing", "otel-nosdk")


class _State:
    """What this process's variant set up: the span exporter and provider (``tracing``)."""

    exporter: Any = None
    provider: Any = None


def _dropping_exporter() -> Any:
    """A SpanExporter that counts the spans handed to it and drops them (SUCCESS): the cost
    measured is making and recording spans, not exporting them. Made at run time: the SDK is
    only needed by the tracing variant."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class DroppingExporter(SpanExporter):
        def __init__(self) -> None:
            self.spans = 0
            self.kinds: dict[str, int] = {}

        def export(self, spans: Any) -> Any:
            self.spans += len(spans)
            for span in spans:
                kind = span.kind.name
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return True

    return DroppingExporter()


def _tracing_class(where: str) -> Any:
    try:
        from nerve.tracing import Tracing
    except ImportError as exc:
        raise Unsupported(f"{where} has no nerve.tracing ({exc})") from None
    return Tracing


def variant_report(broker: Any, variant: str) -> dict[str, Any]:
    """This node's side of ``benchreport.report``: a scrape of its metrics, its spans."""
    out: dict[str, Any] = {}
    if variant == "metrics":
        text = broker.metrics.exposition()
        out["exposition_bytes"] = len(text)
        out["requests"] = _request_totals(text.decode())
    if variant in ("tracing", "otel-nosdk"):
        from opentelemetry import trace

        out["global_provider"] = type(trace.get_tracer_provider()).__name__
    if variant == "tracing":
        _State.provider.force_flush()
        out["spans"] = _State.exporter.spans
        out["span_kinds"] = dict(_State.exporter.kinds)
    return out


def _request_totals(text: str) -> dict[str, float]:
    """``moleculer_request_total`` per (action, type) from an exposition, as "action/type"."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("moleculer_request_total{"):
            labels, _, value = line[len("moleculer_request_total{"):].rpartition("} ")
            fields = dict(part.split("=", 1) for part in labels.split(","))
            key = f"{fields.get('action', '').strip(chr(34))}/{fields.get('type', '').strip(chr(34))}"
            if float(value):
                out[key] = float(value)
    return out


class BenchReport(nerve.Service):
    """Served by the metrics and tracing variants only (plain nerve serves what it always did)."""

    name = "benchreport"
    variant = "none"

    @nerve.action
    async def report(self, ctx: nerve.Context) -> dict[str, Any]:
        out = variant_report(self.broker, self.variant)
        if self.variant != "metrics":
            # did this very call (made like the echo calls) carry W3C trace context?
            out["traceparent"] = isinstance(ctx.headers, dict) and "traceparent" in ctx.headers
        return out


def _passthrough_class() -> type:
    """A middleware that wraps the three call hooks and only awaits the next handler: the cost
    of one layer of the chain. Made at run time: older revisions have no ``nerve.Middleware``."""

    class Passthrough(nerve.Middleware):  # type: ignore[name-defined,misc]
        def call(self, next: Any) -> Any:
            async def handler(action: str, params: Any, opts: Any) -> Any:
                return await next(action, params, opts)

            return handler

        def local_action(self, next: Any, action: Any) -> Any:
            async def handler(ctx: Any) -> Any:
                return await next(ctx)

            return handler

        def remote_action(self, next: Any, action: Any) -> Any:
            async def handler(ctx: Any) -> Any:
                return await next(ctx)

            return handler

    return Passthrough


def middleware_options(variant: str, side: str) -> dict[str, Any]:
    """The Broker's options for ``--middlewares`` on ``side`` (none for the plain variant, so
    any revision runs it); raises Unsupported when this nerve lacks the API."""
    if variant == "none":
        return {}
    where = f"nerve at {Path(nerve.__file__).parent}"
    params = inspect.signature(nerve.Broker).parameters
    if variant == "metrics":
        if "metrics" not in params:
            raise Unsupported(f"{where}: nerve.Broker takes no metrics=")
        try:
            importlib.import_module("nerve.metrics")
            importlib.import_module("prometheus_client")
        except ImportError as exc:
            raise Unsupported(f"metrics: {exc} (pip install -e '.[bench]')") from None
        return {"metrics": True}
    if not hasattr(nerve, "Middleware"):
        raise Unsupported(f"{where} has no nerve.Middleware (the middleware API)")
    if "middlewares" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise Unsupported(f"{where}: nerve.Broker takes no middlewares=")
    if variant == "3mw":
        cls = _passthrough_class()
        return {"middlewares": [cls(), cls(), cls()]}
    if variant == "ft":
        try:
            from nerve import middlewares as builtin
        except ImportError as exc:
            raise Unsupported(f"{where} has no nerve.middlewares ({exc})") from None
        name = "CircuitBreaker" if side == "client" else "Bulkhead"
        if not hasattr(builtin, name):
            raise Unsupported(f"{where} has no nerve.middlewares.{name}")
        # The bulkhead sized above the deepest pipeline the harness runs (64 in flight), so the
        # figure is what the two cost, not the queueing a smaller bulkhead would (by design) add.
        options = {"concurrency": 128, "max_queue_size": 128} if name == "Bulkhead" else {}
        return {"middlewares": [getattr(builtin, name)(**options)]}
    if variant == "otel-nosdk":
        # the API only: the global provider stays the API's proxy, so Tracing wraps nothing
        return {"middlewares": [_tracing_class(where)()]}
    if variant == "tracing":
        tracing = _tracing_class(where)
        try:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise Unsupported(f"tracing: no OpenTelemetry SDK ({exc}; pip install -e '.[bench]')") from None
        if _State.provider is None:  # one provider per process (the probe builds two brokers)
            _State.exporter = _dropping_exporter()
            _State.provider = TracerProvider()
            _State.provider.add_span_processor(BatchSpanProcessor(_State.exporter))
        return {"middlewares": [tracing(tracer_provider=_State.provider)]}
    raise SystemExit(f"nerve peer: unknown --middlewares {variant}")


async def probe(args: Any) -> None:
    """Print whether this nerve can run ``--middlewares`` (building both sides' brokers, not
    starting them) and where it was imported from."""
    out: dict[str, Any] = {"probe": True, "nerve": nerve.__file__}
    try:
        for side in ("server", "client"):
            nerve.Broker(f"bench-probe-{side}", **middleware_options(args.middlewares, side))
    except Unsupported as exc:
        out["skipped"] = str(exc)
    except TypeError as exc:  # a Broker that refuses the option or these middlewares
        out["skipped"] = f"nerve at {Path(nerve.__file__).parent} refused the middlewares: {exc}"
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


def tls_options(args: Any, side: str) -> dict[str, Any]:
    """The Broker's TLS options with --tls-dir (certificates made by the harness: the server's
    names node ``bench-server``, 127.0.0.1 and localhost), else none. Not mutual."""
    if not args.tls_dir:
        return {}
    d = Path(args.tls_dir)
    return {"tls_cert": d / f"{side}.crt", "tls_key": d / f"{side}.key", "tls_ca": d / "ca.pem"}


def transport_options(args: Any, side: str) -> dict[str, Any]:
    """The Broker's transport options: nerve's TCP (the server listens on --port, the client
    dials it; the serializer left at its default) or NATS (--nats, --namespace, --serializer)."""
    if args.transport == "nats":
        return {"transport": args.nats, "namespace": args.namespace, "serializer": args.serializer}
    if side == "server":
        return {"transport": f"tcp://{args.host}:{args.port}"}
    return {"transport": f"tcp://{args.host}:0", "peers": [f"tcp://{args.host}:{args.port}"]}


async def server(args: Any) -> None:
    if args.probe:
        await probe(args)
        return
    services: list[Any] = [Echo(), Counter(), Storage(), File(), Disk()]
    if args.middlewares in REPORTING:
        report = BenchReport()
        report.variant = args.middlewares
        services.append(report)
    with trio.move_on_after(args.deadline):
        async with nerve.Broker("bench-server", services=services,
                                **transport_options(args, "server"),
                                **tls_options(args, "server"),
                                **middleware_options(args.middlewares, "server")) as broker:
            ready(address=broker.address, nerve=nerve.__file__)
            await trio.sleep_forever()


async def rpc(broker: nerve.Broker, args: Any) -> dict[str, Any]:
    # With --timeout, the call option as users pass it (a partial adds no coroutine frame).
    extra = {"timeout": args.timeout} if args.timeout else {}
    return await measure_rpc(functools.partial(broker.call, "echo.echo", **extra), args)


async def events(broker: nerve.Broker, args: Any) -> dict[str, Any]:
    emit = broker.emit
    warm = min(args.warmup, 1000)
    for _ in range(warm):
        await emit("bench.tick", PARAMS)
    await _wait_count(broker, warm, 10.0)
    cpu0 = mark("start")
    start = time.perf_counter()
    for _ in range(args.count):
        await emit("bench.tick", PARAMS)
    sent_s = time.perf_counter() - start
    got = await _wait_count(broker, warm + args.count, 10.0) - warm
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    return {"client_cpu_s": cpu, "sent": args.count, "received": got, "lost": args.count - got, "seconds": elapsed,
            "send_seconds": sent_s, "events_per_s": got / elapsed}


async def _wait_count(broker: nerve.Broker, expected: int, idle_timeout: float) -> int:
    """Poll the server's counter until it reaches ``expected`` or stops moving."""
    last, last_change = -1, time.perf_counter()
    while True:
        got = await broker.call("counter.count")
        if got >= expected:
            return got
        now = time.perf_counter()
        if got != last:
            last, last_change = got, now
        elif now - last_change > idle_timeout:
            return got
        await trio.sleep(0.002)


async def upload(broker: nerve.Broker, args: Any) -> dict[str, Any]:
    action = ACTIONS[args.actions][1]
    warm = await broker.call(action, stream=nerve.PacketStream.from_iterable(
        _chunks(4 * args.chunk, args.chunk)))
    assert warm == 4 * args.chunk, warm
    idle = idle_and_wait()
    cpu0 = mark("start")
    start = time.perf_counter()
    got = await broker.call(action, stream=nerve.PacketStream.from_iterable(
        _chunks(args.size, args.chunk)))
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    if got != args.size:
        raise SystemExit(f"upload: server counted {got} bytes, expected {args.size}")
    return {"client_cpu_s": cpu, "bytes": got, "seconds": elapsed, "mb_per_s": got / elapsed / 1e6,
            "client_rss_idle_kb": idle, "window": broker.stream_window, "chunk": broker.max_chunk}


async def download(broker: nerve.Broker, args: Any, rate: float = 0.0) -> dict[str, Any]:
    action = ACTIONS[args.actions][2]
    warm = await broker.call(action, {"size": 4 * args.chunk, "chunk": args.chunk})
    assert len(await warm.read_all()) == 4 * args.chunk
    idle = idle_and_wait()
    cpu0 = mark("start")
    start = time.perf_counter()
    stream = await broker.call(action, {"size": args.size, "chunk": args.chunk})
    got = 0
    pacer = Pacer(rate)
    try:
        async for chunk in stream:
            got += len(chunk)
            if rate:
                delay = pacer.delay(got)
                if delay:
                    await trio.sleep(delay)
    except Exception as exc:
        if StreamOverflowError is None or not isinstance(exc, StreamOverflowError):
            raise
        # a producer without flow control got more than max_stream_buffer ahead: an outcome
        # the harness records (or refuses, for nerve on both sides), not a crash
        elapsed = time.perf_counter() - start
        cpu = mark("end") - cpu0
        return {"client_cpu_s": cpu, "stream_error": f"{type(exc).__name__}: {exc}", "stream_reader": "client",
                "bytes_read": got, "seconds": elapsed, "client_rss_idle_kb": idle,
                "window": broker.stream_window, "chunk": broker.max_chunk,
                "max_stream_buffer": getattr(broker, "max_stream_buffer", None), "rate": rate}
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    if got != args.size:
        raise SystemExit(f"download: received {got} bytes, expected {args.size}")
    return {"client_cpu_s": cpu, "bytes": got, "seconds": elapsed, "mb_per_s": got / elapsed / 1e6,
            "client_rss_idle_kb": idle, "window": broker.stream_window, "chunk": broker.max_chunk,
            "rate": rate}


def _check_file(what: str, got: int, check: dict[str, Any], args: Any) -> str:
    """Fail the run unless the destination has the source's size (and SHA-256, when the
    harness gave it): what was checked."""
    if got != args.size or check["size"] != args.size:
        raise SystemExit(f"{what}: {got} bytes transferred, the destination has {check['size']}, "
                         f"expected {args.size}")
    if args.sha256:
        if check.get("sha256") != args.sha256:
            raise SystemExit(f"{what}: the destination's SHA-256 is {check.get('sha256')}, "
                             f"the source's {args.sha256}")
        return "sha256"
    return "size"


async def file_upload(broker: nerve.Broker, args: Any) -> dict[str, Any]:
    """``PacketStream.from_file(src)`` to ``disk.put`` (``transfer_to(dest)`` on the server)."""
    dest = str(Path(args.dir) / f"nerve-upload-{os.getpid()}.bin")
    # warm-up: the same action and transfer_to (threads, fsync, rename), 4 chunks from memory
    warm = await broker.call("disk.put", {"dest": dest}, stream=nerve.PacketStream.from_iterable(
        _chunks(4 * args.chunk, args.chunk)))
    assert warm == 4 * args.chunk, warm
    await broker.call("disk.done", {"dest": dest})
    idle = idle_and_wait()
    cpu0 = mark("start")
    start = time.perf_counter()
    got = await broker.call("disk.put", {"dest": dest}, stream=nerve.PacketStream.from_file(args.file))
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    verified = _check_file("file upload", got, await broker.call(
        "disk.done", {"dest": dest, "sha256": bool(args.sha256)}), args)
    return {"client_cpu_s": cpu, "bytes": got, "seconds": elapsed, "mb_per_s": got / elapsed / 1e6,
            "client_rss_idle_kb": idle, "window": broker.stream_window, "chunk": broker.max_chunk,
            "verified": verified}


async def file_download(broker: nerve.Broker, args: Any) -> dict[str, Any]:
    """``disk.get`` (``PacketStream.from_file(src)`` on the server), ``transfer_to(dest)`` here."""
    dest = Path(args.dir) / f"nerve-download-{os.getpid()}.bin"
    warm = await broker.call("storage.download", {"size": 4 * args.chunk, "chunk": args.chunk})
    assert await warm.transfer_to(dest) == 4 * args.chunk
    await trio.to_thread.run_sync(_finish_file, dest, False)
    idle = idle_and_wait()
    cpu0 = mark("start")
    start = time.perf_counter()
    stream = await broker.call("disk.get", {"path": args.file})
    got = await stream.transfer_to(dest)
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    verified = _check_file("file download", got,
                           await trio.to_thread.run_sync(_finish_file, dest, bool(args.sha256)), args)
    return {"client_cpu_s": cpu, "bytes": got, "seconds": elapsed, "mb_per_s": got / elapsed / 1e6,
            "client_rss_idle_kb": idle, "window": broker.stream_window, "chunk": broker.max_chunk,
            "verified": verified}


def _percentiles(prefix: str, latencies_ns: list[int]) -> dict[str, float]:
    """p50, p99 and p99.9 (µs) of some calls' latencies, keys prefixed (``idle_``: no transfer)."""
    s = sorted(latencies_ns)
    n = len(s)

    def at(q: float) -> float:
        return round(s[min(n - 1, int(q * n))] / 1000.0, 2) if n else 0.0

    return {f"{prefix}p50_us": at(0.50), f"{prefix}p99_us": at(0.99), f"{prefix}p999_us": at(0.999)}


async def rpc_under_transfer(broker: nerve.Broker, args: Any) -> dict[str, Any]:
    """``--inflight`` echo calls in flight on the one connection, first alone for ``--duration``
    seconds, then while ``--size`` bytes are uploaded on the same connection: every call's
    latency, the calls/s of each phase and the upload's MB/s."""
    call = broker.call
    params = PARAMS
    upload_action = ACTIONS[args.actions][1]
    if await call("echo.echo", params) != params:
        raise SystemExit("echo returned something else")
    warm = 0

    async def warm_worker() -> None:
        nonlocal warm
        while warm < args.warmup:
            warm += 1
            await call("echo.echo", params)

    async with trio.open_nursery() as nursery:
        for _ in range(args.inflight):
            nursery.start_soon(warm_worker)
    got = await call(upload_action, stream=nerve.PacketStream.from_iterable(_chunks(4 * args.chunk, args.chunk)))
    assert got == 4 * args.chunk, got
    clock = time.perf_counter_ns

    async def load(running: Any, done: list[int]) -> list[int]:
        """``--inflight`` workers calling while ``running()``: every call's latency (ns);
        ``done[0]`` counts the calls that ended while it still held."""
        latencies: list[int] = []

        async def worker() -> None:
            record = latencies.append
            while running():
                t0 = clock()
                await call("echo.echo", params)
                record(clock() - t0)
                if running():
                    done[0] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(args.inflight):
                nursery.start_soon(worker)
        return latencies

    # 1. no transfer, the same load, just before
    stop_at = time.perf_counter() + args.duration
    idle_done = [0]
    start = time.perf_counter()
    idle = await load(lambda: time.perf_counter() < stop_at, idle_done)
    idle_s = time.perf_counter() - start
    # 2. the same load while the upload runs
    transfer: dict[str, Any] = {}

    async def upload_task() -> None:
        t0 = time.perf_counter()
        transfer["bytes"] = await call(upload_action, stream=nerve.PacketStream.from_iterable(
            _chunks(args.size, args.chunk)))
        transfer["seconds"] = time.perf_counter() - t0

    during_done = [0]
    cpu0 = mark("start")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upload_task)
        during = await load(lambda: "seconds" not in transfer, during_done)
    cpu = mark("end") - cpu0
    if transfer["bytes"] != args.size:
        raise SystemExit(f"rpc_under_transfer: the server counted {transfer['bytes']} bytes, expected {args.size}")
    seconds = transfer["seconds"]
    out = {"client_cpu_s": cpu, "calls": len(during), "calls_ended_during": during_done[0],
           "req_per_s": during_done[0] / seconds, "bytes": args.size, "seconds": seconds,
           "mb_per_s": args.size / seconds / 1e6, **_percentiles("", during),
           "idle_calls": len(idle), "idle_seconds": idle_s, "idle_req_per_s": idle_done[0] / idle_s,
           **_percentiles("idle_", idle), "window": broker.stream_window, "chunk": broker.max_chunk}
    out["p99_rise"] = out["p99_us"] / out["idle_p99_us"] if out["idle_p99_us"] else None
    return out


async def inproc(args: Any) -> dict[str, Any]:
    async with nerve.Broker("bench-inproc", services=[Echo()]) as broker:
        call = broker.call
        params = PARAMS
        for _ in range(args.warmup):
            await call("echo.echo", params)
        n = args.count
        start = time.perf_counter_ns()
        for _ in range(n):
            await call("echo.echo", params)
        elapsed = time.perf_counter_ns() - start
    return {"calls": n, "seconds": elapsed / 1e9, "ns_per_call": elapsed / n}


async def client(args: Any) -> None:
    if args.scenario == "inproc":
        result(**await inproc(args), nerve=nerve.__file__)
        return
    # A process-level alarm, not trio.fail_after: under a trio deadline every call would carry
    # its remaining budget as the REQ timeout, which no peer here pays for.
    arm_deadline(args.deadline)
    async with nerve.Broker("bench-client", **transport_options(args, "client"),
                            **tls_options(args, "client"),
                            **middleware_options(args.middlewares, "client")) as broker:
        reporting = args.middlewares in REPORTING
        await broker.wait_for_services("echo", "counter", ACTIONS[args.actions][0],
                                       *(["benchreport"] if reporting else []),
                                       *(["disk"] if args.scenario in FILE_SCENARIOS else []), timeout=15)
        if args.scenario == "rpc":
            out = await rpc(broker, args)
        elif args.scenario == "events":
            out = await events(broker, args)
        elif args.scenario == "upload":
            out = await upload(broker, args)
        elif args.scenario == "download":
            out = await download(broker, args)
        elif args.scenario == "slow":
            out = await download(broker, args, rate=args.rate)
        elif args.scenario == "file_upload":
            out = await file_upload(broker, args)
        elif args.scenario == "file_download":
            out = await file_download(broker, args)
        elif args.scenario == "rpc_under_transfer":
            out = await rpc_under_transfer(broker, args)
        else:
            raise SystemExit(f"nerve peer: unknown scenario {args.scenario}")
        if reporting:  # after the measured part (the harness's marks are behind us)
            made = out["calls"] + args.warmup + 1 if args.scenario == "rpc" else None
            out["variant"] = check_report(args.middlewares, made, {
                "server": await broker.call("benchreport.report"),
                "client": variant_report(broker, args.middlewares)})
    result(**out, nerve=nerve.__file__)


def check_report(variant: str, made: int | None, report: dict[str, Any]) -> dict[str, Any]:
    """Fail the run when the variant did not do what it is there to measure: metrics that did
    not count every echo.echo call (``made``, rpc: the measured ones, the warm-up and the first,
    checked one), spans that were not made (or were made with no SDK). Spans the SDK dropped
    (its queue full) are counted in ``spans_dropped``."""
    if variant == "metrics" and made is not None:
        served = report["server"]["requests"].get("echo.echo/local", 0)
        called = report["client"]["requests"].get("echo.echo/remote", 0)
        if served != made or called != made:
            raise SystemExit(f"metrics: {made} echo.echo calls made, but the server counted {served} "
                             f"served and the client {called} made")
    if variant == "tracing":
        for side in ("server", "client"):
            spans = report[side]["spans"]
            if made is not None:
                # the server's report is flushed while the report call runs (its span is not
                # ended yet); the client's after that call: one more span
                report[side]["spans_expected"] = made + (side == "client")
                report[side]["spans_dropped"] = max(0, report[side]["spans_expected"] - spans)
            if not spans:
                raise SystemExit(f"tracing: the {side} exported no span")
        if not report["server"]["traceparent"]:
            raise SystemExit("tracing: the client's calls carry no traceparent")
    if variant == "otel-nosdk":
        for side in ("server", "client"):
            provider = report[side]["global_provider"]
            if provider not in ("ProxyTracerProvider", "NoOpTracerProvider"):
                raise SystemExit(f"otel-nosdk: the {side}'s global tracer provider is {provider}")
        if report["server"]["traceparent"]:
            raise SystemExit("otel-nosdk: the client's calls carry a traceparent with no SDK")
    return report


#: the scenarios only nerve runs (beside _common's): --scenario accepts them too
FILE_SCENARIOS = ("file_upload", "file_download")
NERVE_SCENARIOS = (*FILE_SCENARIOS, "rpc_under_transfer")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    p = parser(__doc__ or "")
    for a in p._actions:  # _common's --scenario, plus nerve's own
        if a.dest == "scenario" and a.choices is not None:
            a.choices = [*a.choices, *NERVE_SCENARIOS]
    p.add_argument("--file", default="", help="file_*: the source file (made by the harness)")
    p.add_argument("--dir", default="", help="file_*: the directory of the destinations")
    p.add_argument("--sha256", default="", help="file_*: the source's SHA-256: the destination must match it")
    p.add_argument("--middlewares", choices=VARIANTS, default="none",
                   help="the variant: none, three do-nothing middlewares, circuit breaker + bulkhead, "
                        "metrics=True, Tracing with the SDK (spans dropped), Tracing with no SDK")
    p.add_argument("--probe", action="store_true",
                   help="print whether this nerve can run --middlewares, and exit")
    p.add_argument("--transport", choices=["tcp", "nats"], default="tcp",
                   help="nerve's TCP transport (one connection) or NATS (--nats, --namespace)")
    p.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS: the server's URL")
    p.add_argument("--namespace", default="", help="NATS: the cluster's namespace (one per run)")
    p.add_argument("--serializer", choices=["msgpack", "json"], default="msgpack",
                   help="NATS: the serializer (nerve's TCP transport keeps its default)")
    p.add_argument("--actions", choices=list(ACTIONS), default="storage",
                   help="the stream actions the client calls: storage.upload/download (nerve's "
                        "server) or file.save/get (js/server.js; nerve's server serves both)")
    args = p.parse_args()
    trio.run(server if args.mode == "server" else client, args)


if __name__ == "__main__":
    main()
