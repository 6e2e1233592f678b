"""A node of the three-process metrics cluster (tests/test_metrics.py), in its own process.

``--role a``: ``a.work`` calls b.echo, c.fail (and catches its error), emits ``thing.happened``
and uploads ``size`` bytes to c.sink. ``--role b``: b.echo and a ``thing.happened`` handler.
``--role c``: c.fail (raises a 500), c.sink (reads a stream) and a ``thing.happened`` handler.
Serves Prometheus metrics on 127.0.0.1 (a free port) and prints one JSON line
``{"nodeID", "address", "metrics"}`` once serving; stops gracefully on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal

import trio

import nerve
from nerve.errors import NerveError


class A(nerve.Service):
    name = "a"

    @nerve.action
    async def work(self, ctx: nerve.Context) -> dict[str, object]:
        size = int(ctx.params.get("size", 0))
        echoed = await ctx.call("b.echo", {"x": 1})
        try:
            await ctx.call("c.fail", {})
        except NerveError as exc:
            failed = type(exc).__name__
        await ctx.emit("thing.happened", {"n": 1})
        stream = nerve.PacketStream()

        async def produce() -> None:
            await stream.send(b"z" * size)
            await stream.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            got = await ctx.call("c.sink", stream=stream)
        return {"echo": echoed, "failed": failed, "sunk": got}


class B(nerve.Service):
    name = "b"

    @nerve.action
    async def echo(self, ctx: nerve.Context) -> object:
        return ctx.params

    @nerve.event("thing.happened")
    async def happened(self, ctx: nerve.Context) -> None:
        pass


class C(nerve.Service):
    name = "c"

    @nerve.action
    async def fail(self, ctx: nerve.Context) -> None:
        raise NerveError("c.fail always fails", code=500, type="ALWAYS")

    @nerve.action
    async def sink(self, ctx: nerve.Context) -> int:
        assert ctx.stream is not None
        return len(await ctx.stream.read_all())

    @nerve.event("thing.happened")
    async def happened(self, ctx: nerve.Context) -> None:
        pass


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["a", "b", "c"], required=True)
    p.add_argument("--peer", action="append", default=[])
    args = p.parse_args()
    service = {"a": A, "b": B, "c": C}[args.role]()
    async with nerve.Broker(f"metrics-{args.role}", transport="tcp://127.0.0.1:0", peers=args.peer,
                            services=[service], metrics_port="127.0.0.1:0",
                            heartbeat_interval=0.5) as broker:
        assert broker.metrics is not None
        print(json.dumps({"nodeID": broker.node_id, "address": broker.address,
                          "metrics": broker.metrics.url}), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break


if __name__ == "__main__":
    trio.run(main)
