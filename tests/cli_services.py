"""Services for the CLI tests, loaded by ``nerve run --service cli_services:Lab`` from the
tests directory (so the import from the current directory is tested too)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import trio

import nerve


def blob(size: int) -> bytes:
    """The ``size`` bytes ``lab.blob`` streams."""
    block = hashlib.sha256(b"lab").digest() * 4096
    return (block * (size // len(block) + 1))[:size]


class Lab(nerve.Service):
    name = "lab"

    @nerve.action
    async def echo(self, ctx: nerve.Context) -> dict[str, Any]:
        return {"params": ctx.params, "node": self.broker.node_id, "meta": ctx.meta}

    @nerve.action
    async def slow(self, ctx: nerve.Context) -> str:
        await trio.sleep(float(ctx.params.get("seconds", 60)))
        return "done"

    @nerve.action
    async def blob(self, ctx: nerve.Context) -> nerve.PacketStream:
        data = blob(int(ctx.params["size"]))

        async def chunks() -> Any:
            for at in range(0, len(data), 100_000):
                yield data[at:at + 100_000]

        return nerve.PacketStream.from_iterable(chunks())

    @nerve.action
    async def digest(self, ctx: nerve.Context) -> dict[str, Any]:
        """SHA-256 of the request stream, read at ``rate`` bytes/s if given."""
        assert ctx.stream is not None
        rate = (ctx.params or {}).get("rate")
        h = hashlib.sha256()
        async for chunk in ctx.stream:
            h.update(chunk)
            if rate:
                await trio.sleep(len(chunk) / rate)
        return {"sha256": h.hexdigest()}

    @nerve.event("lab.*")
    async def seen(self, ctx: nerve.Context) -> None:
        print(json.dumps({"event": ctx.event, "data": ctx.params, "groups": ctx.event_groups}), flush=True)


class Other(nerve.Service):
    name = "other"

    @nerve.event("lab.*")
    async def seen(self, ctx: nerve.Context) -> None:
        print(json.dumps({"other": ctx.event, "data": ctx.params}), flush=True)
