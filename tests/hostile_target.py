"""A nerve node in its own process, the target of the hostile-peer tests (test_hostile_peers).

Prints one JSON line ``{"nodeID", "address", "pid"}`` once serving; stops on SIGTERM.
``--opts`` is a JSON object of extra ``nerve.Broker`` keyword arguments (limits under test).

Service ``t``: ``echo``; ``touch`` (counts calls: did a frame reach a handler?); ``upload``
(SHA-256 of the request stream); ``download`` (``size`` seeded bytes, see :func:`block`);
``park`` (a stream handler that never reads); ``push`` (a response stream fed by a task of
the node, which records how its producer ended); ``hold`` (sleeps); ``relay`` (calls another
action and reads its response stream); ``stats`` (what the node holds, as numbers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
from typing import Any

import trio

import nerve

CHUNK = 256 * 1024


def block(seed: int) -> bytes:
    """256 KiB derived from ``seed``: the content of ``download`` / the tests' uploads."""
    return hashlib.sha256(str(seed).encode()).digest() * (CHUNK // 32)


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Target(nerve.Service):
    name = "t"

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.touched = 0
        self.events = 0
        self.parked: set[Any] = set()
        self.outcomes: dict[str, str] = {}

    @nerve.action
    async def echo(self, ctx: nerve.Context) -> Any:
        return ctx.params

    @nerve.action
    async def touch(self, ctx: nerve.Context) -> int:
        self.touched += 1
        return self.touched

    @nerve.event("evil.**")
    async def on_evil(self, ctx: nerve.Context) -> None:
        self.events += 1

    @nerve.action
    async def upload(self, ctx: nerve.Context) -> dict[str, Any]:
        assert ctx.stream is not None
        h = hashlib.sha256()
        n = 0
        async for chunk in ctx.stream:
            h.update(chunk)
            n += len(chunk)
        return {"size": n, "sha256": h.hexdigest()}

    @nerve.action
    async def download(self, ctx: nerve.Context) -> nerve.PacketStream:
        size, seed = int(ctx.params["size"]), int(ctx.params.get("seed", 0))

        async def chunks() -> Any:
            data, left = block(seed), size
            while left > 0:
                yield data[:min(left, CHUNK)]
                left -= CHUNK

        return nerve.PacketStream.from_iterable(chunks())

    @nerve.action
    async def park(self, ctx: nerve.Context) -> None:
        """Hold the request stream without reading it, until cancelled."""
        self.parked.add(ctx.stream)
        try:
            await trio.sleep_forever()
        finally:
            self.parked.discard(ctx.stream)

    @nerve.action
    async def push(self, ctx: nerve.Context) -> nerve.PacketStream:
        tag, size = str(ctx.params["tag"]), int(ctx.params["size"])
        stream = nerve.PacketStream()
        self.outcomes[tag] = "running"

        async def produce() -> None:
            try:
                data, left = block(0), size
                while left > 0:
                    await stream.send(data[:min(left, CHUNK)])
                    left -= CHUNK
                await stream.close()
                self.outcomes[tag] = "ok"
            except BaseException as exc:
                self.outcomes[tag] = type(exc).__name__
                self.outcomes[tag + ".message"] = str(exc)
                if not isinstance(exc, Exception):
                    raise

        self.nursery.start_soon(produce)
        return stream

    @nerve.action(name="outcomes")
    async def outcomes_(self, ctx: nerve.Context) -> dict[str, str]:
        return dict(self.outcomes)

    @nerve.action
    async def hold(self, ctx: nerve.Context) -> None:
        await trio.sleep(float(ctx.params.get("seconds", 30)))

    @nerve.action
    async def relay(self, ctx: nerve.Context) -> dict[str, Any]:
        result = await ctx.call(str(ctx.params["action"]), ctx.params.get("params") or {})
        if isinstance(result, nerve.PacketStream):
            data = await result.read_all()
            return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return {"result": result}

    @nerve.action
    async def stats(self, ctx: nerve.Context) -> dict[str, Any]:
        broker = self.broker
        transit = getattr(broker, "transit", None)
        return {
            "pid": os.getpid(),
            "rss": rss(),
            "touched": self.touched,
            "events": self.events,
            "parked": len(self.parked),
            "parked_buffered": sum(s.statistics().bytes_buffered for s in self.parked if s is not None),
            "serving": len(getattr(transit, "serving", ())),
            "registry": sorted(broker.registry.nodes),
            "connected": sorted(broker.transport.connected()),
        }


async def main(args: argparse.Namespace) -> None:
    opts: dict[str, Any] = dict(heartbeat_interval=0.2, heartbeat_timeout=3.0)
    opts.update(json.loads(args.opts))
    if args.secret is not None:
        opts["secret"] = args.secret
    async with trio.open_nursery() as nursery:
        async with nerve.Broker(args.node_id, transport="tcp://127.0.0.1:0", peers=args.peer,
                                services=[Target(nursery)], **opts) as broker:
            print(json.dumps({"nodeID": broker.node_id, "address": broker.address, "pid": os.getpid()}),
                  flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--node-id", required=True)
    p.add_argument("--peer", action="append", default=[])
    p.add_argument("--secret", default=None)
    p.add_argument("--opts", default="{}")
    trio.run(main, p.parse_args())
