"""A nerve node hosting a ``files`` service, in its own process, for the stream tests.

Prints one JSON line ``{"nodeID", "address", "pid"}`` once serving; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import trio

import nerve


class Files(nerve.Service):
    name = "files"

    def __init__(self, root: Path) -> None:
        self.root = root

    @nerve.action
    async def save(self, ctx: nerve.Context) -> dict[str, Any]:
        """Write the request stream to root/<meta.filename> (atomically)."""
        assert ctx.stream is not None
        target = self.root / Path(str(ctx.meta["filename"])).name
        size = await ctx.stream.transfer_to(target)
        return {"size": size, "sha256": await trio.to_thread.run_sync(_sha256, target)}

    @nerve.action
    async def digest(self, ctx: nerve.Context) -> dict[str, Any]:
        """SHA-256 of the request stream, read at ``rate`` bytes/s if given."""
        assert ctx.stream is not None
        rate = ctx.params.get("rate") if isinstance(ctx.params, dict) else None
        h = hashlib.sha256()
        n = 0
        async for chunk in ctx.stream:
            h.update(chunk)
            n += len(chunk)
            if rate:
                await trio.sleep(len(chunk) / rate)
        return {"size": n, "sha256": h.hexdigest()}

    @nerve.action
    async def load(self, ctx: nerve.Context) -> nerve.PacketStream:
        path = self.root / Path(str(ctx.params["name"])).name
        ctx.meta["size"] = path.stat().st_size
        return nerve.PacketStream.from_file(path)

    @nerve.action
    async def generate(self, ctx: nerve.Context) -> nerve.PacketStream:
        """``size`` pseudo-random bytes (seeded), produced as fast as credit allows."""
        size = int(ctx.params["size"])
        seed = int(ctx.params.get("seed", 0))

        async def chunks() -> Any:
            left = size
            block = hashlib.sha256(str(seed).encode()).digest() * 8192  # 256 KiB
            while left > 0:
                n = min(left, len(block))
                yield block[:n]
                left -= n

        return nerve.PacketStream.from_iterable(chunks())

    @nerve.action
    async def ping(self, ctx: nerve.Context) -> int:
        return os.getpid()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


async def main(args: argparse.Namespace) -> None:
    async with nerve.Broker(
        args.node_id, transport="tcp://127.0.0.1:0", peers=args.peer, services=[Files(Path(args.root))],
        heartbeat_interval=0.2, heartbeat_timeout=1.5, stream_idle_timeout=args.idle,
    ) as broker:
        print(json.dumps({"nodeID": broker.node_id, "address": broker.address, "pid": os.getpid()}), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--node-id", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--peer", action="append", default=[])
    p.add_argument("--idle", type=float, default=30.0)
    trio.run(main, p.parse_args())
