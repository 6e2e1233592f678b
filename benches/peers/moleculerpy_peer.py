"""MoleculerPy (asyncio, Python >= 3.12) peer over NATS with the JSON serializer: echo RPC and
fire-and-forget events. Run with the interpreter of the MoleculerPy virtualenv the harness
makes (``benches/run.sh`` prepares it), never with nerve's.

    python benches/peers/moleculerpy_peer.py server --namespace NS
    python benches/peers/moleculerpy_peer.py client --namespace NS --scenario rpc --inflight 64
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PARAMS, mark, parser, percentiles_us, ready, result  # noqa: E402
from moleculerpy import Service, ServiceBroker, Settings, action, event  # noqa: E402

received = 0


class Echo(Service):
    name = "echo"

    @action()
    async def echo(self, ctx: Any) -> Any:
        return ctx.params


class Counter(Service):
    name = "counter"

    @event("bench.tick")
    async def tick(self, ctx: Any) -> None:
        global received
        received += 1

    @action()
    async def count(self, ctx: Any) -> int:
        return received


def make_broker(node_id: str, args: Any) -> ServiceBroker:
    settings = Settings(transporter=args.nats, serializer="JSON", log_level="ERROR",
                        request_timeout=60.0)
    return ServiceBroker(id=node_id, settings=settings, namespace=args.namespace)


async def server(args: Any) -> None:
    broker = make_broker("bench-server", args)
    await broker.register(Echo())
    await broker.register(Counter())
    await broker.start()
    ready()
    try:
        await asyncio.sleep(args.deadline)
    finally:
        await broker.stop()


async def rpc(broker: ServiceBroker, args: Any) -> dict[str, Any]:
    params = PARAMS
    echoed = await broker.call("echo.echo", params)
    if echoed != params:
        raise SystemExit(f"echo returned {echoed!r}")
    warm = 0

    async def warm_worker() -> None:
        nonlocal warm
        while warm < args.warmup:
            warm += 1
            await broker.call("echo.echo", params)

    await asyncio.gather(*(warm_worker() for _ in range(args.inflight)))
    latencies: list[int] = []
    issued = 0
    stop_at = time.perf_counter() + args.duration
    clock = time.perf_counter_ns

    async def worker() -> None:
        nonlocal issued
        while issued < args.count and time.perf_counter() < stop_at:
            issued += 1
            t0 = clock()
            await broker.call("echo.echo", params)
            latencies.append(clock() - t0)

    cpu0 = mark("start")
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.inflight)))
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    return {"client_cpu_s": cpu, "calls": len(latencies), "seconds": elapsed, "req_per_s": len(latencies) / elapsed,
            **percentiles_us(latencies)}


async def wait_count(broker: ServiceBroker, expected: int, idle_timeout: float = 10.0) -> int:
    last, last_change = -1, time.perf_counter()
    while True:
        got = await broker.call("counter.count", {})
        if got >= expected:
            return got
        now = time.perf_counter()
        if got != last:
            last, last_change = got, now
        elif now - last_change > idle_timeout:
            return got
        await asyncio.sleep(0.002)


async def events(broker: ServiceBroker, args: Any) -> dict[str, Any]:
    warm = min(args.warmup, 1000)
    for _ in range(warm):
        await broker.emit("bench.tick", PARAMS)
    await wait_count(broker, warm)
    cpu0 = mark("start")
    start = time.perf_counter()
    for _ in range(args.count):
        await broker.emit("bench.tick", PARAMS)
    sent_s = time.perf_counter() - start
    got = await wait_count(broker, warm + args.count) - warm
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    return {"client_cpu_s": cpu, "sent": args.count, "received": got, "lost": args.count - got, "seconds": elapsed,
            "send_seconds": sent_s, "events_per_s": got / elapsed}


async def client(args: Any) -> None:
    broker = make_broker(f"bench-client-{os.getpid()}", args)
    await broker.start()
    try:
        await broker.wait_for_services(["echo", "counter"], timeout=20)
        if args.scenario == "rpc":
            coro = rpc(broker, args)
        elif args.scenario == "events":
            coro = events(broker, args)
        else:
            raise SystemExit(f"moleculerpy peer: scenario {args.scenario} is not implemented")
        out = await asyncio.wait_for(coro, args.deadline)
    finally:
        await broker.stop()
    result(**out)


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--namespace", default="nervebench")
    p.add_argument("--nats", default="nats://127.0.0.1:4222")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(server(args) if args.mode == "server" else client(args))


if __name__ == "__main__":
    main()
