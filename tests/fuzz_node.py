"""A nerve node for the live fuzzer's tests, in its own process: typed actions, a request-stream
reader, a response-stream producer and an event handler.

Prints one JSON line ``{"nodeID", "address", "pid"}`` once serving; stops on SIGTERM.
``--fragile`` adds ``fragile.*`` actions with deliberate defects (a process exit, a frozen
event loop) so the tests can check that the fuzzer's oracles and minimizer catch them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from typing import Any

import msgspec
import trio

import nerve


class EchoParams(msgspec.Struct):
    text: str
    n: int = 1


class Fuzz(nerve.Service):
    name = "fuzz"

    @nerve.action
    async def echo(self, ctx: nerve.Context, params: EchoParams) -> dict[str, Any]:
        return {"text": params.text[:64], "n": params.n}

    @nerve.action
    async def upload(self, ctx: nerve.Context) -> int:
        size = 0
        if ctx.stream is not None:
            async for chunk in ctx.stream:
                size += len(chunk)
        return size

    @nerve.action
    async def download(self, ctx: nerve.Context) -> nerve.PacketStream:
        size = int(ctx.params.get("size", 4096)) if isinstance(ctx.params, dict) else 4096

        async def chunks() -> Any:
            left = min(size, 1 << 20)
            while left > 0:
                n = min(left, 16384)
                yield b"d" * n
                left -= n

        return nerve.PacketStream.from_iterable(chunks())

    @nerve.event("fuzz.*")
    async def on_fuzz(self, ctx: nerve.Context) -> None:
        pass


class Fragile(nerve.Service):
    """Deliberate defects: an action that ends the process and one that freezes the loop."""

    name = "fragile"

    @nerve.action
    async def exit(self, ctx: nerve.Context) -> None:
        os._exit(3)

    @nerve.action
    async def freeze(self, ctx: nerve.Context) -> None:
        end = time.monotonic() + 3600
        while time.monotonic() < end:
            pass


async def main(args: argparse.Namespace) -> None:
    services: list[nerve.Service] = [Fuzz()]
    if args.fragile:
        services.append(Fragile())
    async with nerve.Broker(args.node_id, transport="tcp://127.0.0.1:0", services=services,
                            secret=args.secret, heartbeat_interval=1.0, heartbeat_timeout=15.0,
                            stream_idle_timeout=5.0) as broker:
        print(json.dumps({"nodeID": broker.node_id, "address": broker.address, "pid": os.getpid()}), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--node-id", default="fuzz-target")
    p.add_argument("--secret", default=None)
    p.add_argument("--fragile", action="store_true")
    trio.run(main, p.parse_args())
