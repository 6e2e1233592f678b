"""nerve's side of every benchmark: a server broker and a client broker over nerve's TCP
transport (one connection between the two nodes), plus the in-process call cost.

    python benches/peers/nerve_peer.py server --port P
    python benches/peers/nerve_peer.py client --port P --scenario rpc --inflight 64 ...
    python benches/peers/nerve_peer.py client --scenario inproc --count N
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nerve  # noqa: E402
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


class Storage(nerve.Service):
    name = "storage"

    @nerve.action
    async def upload(self, ctx: nerve.Context) -> int:
        assert ctx.stream is not None
        n = 0
        async for chunk in ctx.stream:
            n += len(chunk)
        return n

    @nerve.action
    async def download(self, ctx: nerve.Context) -> nerve.PacketStream:
        p = ctx.params
        return nerve.PacketStream.from_iterable(_chunks(int(p["size"]), int(p["chunk"])))


def tls_options(args: Any, side: str) -> dict[str, Any]:
    """The Broker's TLS options with --tls-dir (certificates made by the harness: the server's
    names node ``bench-server``, 127.0.0.1 and localhost), else none. Not mutual."""
    if not args.tls_dir:
        return {}
    d = Path(args.tls_dir)
    return {"tls_cert": d / f"{side}.crt", "tls_key": d / f"{side}.key", "tls_ca": d / "ca.pem"}


async def server(args: Any) -> None:
    with trio.move_on_after(args.deadline):
        async with nerve.Broker("bench-server", transport=f"tcp://{args.host}:{args.port}",
                                services=[Echo(), Counter(), Storage()],
                                **tls_options(args, "server")) as broker:
            ready(address=broker.address)
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
    warm = await broker.call("storage.upload", stream=nerve.PacketStream.from_iterable(
        _chunks(4 * args.chunk, args.chunk)))
    assert warm == 4 * args.chunk, warm
    idle = idle_and_wait()
    cpu0 = mark("start")
    start = time.perf_counter()
    got = await broker.call("storage.upload", stream=nerve.PacketStream.from_iterable(
        _chunks(args.size, args.chunk)))
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    if got != args.size:
        raise SystemExit(f"upload: server counted {got} bytes, expected {args.size}")
    return {"client_cpu_s": cpu, "bytes": got, "seconds": elapsed, "mb_per_s": got / elapsed / 1e6,
            "client_rss_idle_kb": idle, "window": broker.stream_window, "chunk": broker.max_chunk}


async def download(broker: nerve.Broker, args: Any, rate: float = 0.0) -> dict[str, Any]:
    warm = await broker.call("storage.download", {"size": 4 * args.chunk, "chunk": args.chunk})
    assert len(await warm.read_all()) == 4 * args.chunk
    idle = idle_and_wait()
    cpu0 = mark("start")
    start = time.perf_counter()
    stream = await broker.call("storage.download", {"size": args.size, "chunk": args.chunk})
    got = 0
    pacer = Pacer(rate)
    async for chunk in stream:
        got += len(chunk)
        if rate:
            delay = pacer.delay(got)
            if delay:
                await trio.sleep(delay)
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    if got != args.size:
        raise SystemExit(f"download: received {got} bytes, expected {args.size}")
    return {"client_cpu_s": cpu, "bytes": got, "seconds": elapsed, "mb_per_s": got / elapsed / 1e6,
            "client_rss_idle_kb": idle, "window": broker.stream_window, "chunk": broker.max_chunk,
            "rate": rate}


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
        result(**await inproc(args))
        return
    # A process-level alarm, not trio.fail_after: under a trio deadline every call would carry
    # its remaining budget as the REQ timeout, which no peer here pays for.
    arm_deadline(args.deadline)
    async with nerve.Broker("bench-client", transport=f"tcp://{args.host}:0",
                            peers=[f"tcp://{args.host}:{args.port}"],
                            **tls_options(args, "client")) as broker:
        await broker.wait_for_services("echo", "counter", "storage", timeout=15)
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
        else:
            raise SystemExit(f"nerve peer: unknown scenario {args.scenario}")
    result(**out)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parser(__doc__ or "").parse_args()
    trio.run(server if args.mode == "server" else client, args)


if __name__ == "__main__":
    main()
