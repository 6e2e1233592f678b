"""A nerve node in its own process, for the multi-process tests.

Prints one JSON line ``{"nodeID", "address"}`` once serving; stops gracefully on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import trio

import nerve
from nerve.errors import RequestRejectedError


class Work(nerve.Service):
    name = "work"

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.fail_first = 0
        self.holding = 0
        self.cancelled = 0
        self.finished = 0

    @nerve.action
    async def echo(self, ctx: nerve.Context) -> dict[str, object]:
        self.seen.append(ctx.params["i"])
        return {"i": ctx.params["i"], "node": self.broker.node_id}

    @nerve.action
    async def blob(self, ctx: nerve.Context) -> object:
        return ctx.params

    @nerve.action
    async def seen_count(self, ctx: nerve.Context) -> dict[str, int]:
        return {"count": len(self.seen), "distinct": len(set(self.seen))}

    @nerve.action
    async def slow(self, ctx: nerve.Context) -> dict[str, object]:
        await trio.sleep(float(ctx.params.get("seconds", 1.0)))
        return {"node": self.broker.node_id, "pid": os.getpid()}

    @nerve.action
    async def hold(self, ctx: nerve.Context) -> str:
        """Sleeps ``seconds``, counting how it ended (cancelled by its caller, or finished)."""
        self.holding += 1
        try:
            await trio.sleep(float(ctx.params.get("seconds", 30.0)))
        except trio.Cancelled:
            self.cancelled += 1
            raise
        finally:
            self.holding -= 1
        self.finished += 1
        return "finished"

    @nerve.action
    async def hold_stats(self, ctx: nerve.Context) -> dict[str, int]:
        return {"holding": self.holding, "cancelled": self.cancelled, "finished": self.finished}

    @nerve.action
    async def pid(self, ctx: nerve.Context) -> int:
        return os.getpid()

    @nerve.action
    async def reject_once(self, ctx: nerve.Context) -> str:
        if self.fail_first == 0:
            self.fail_first += 1
            raise RequestRejectedError("first call on this node is rejected")
        return self.broker.node_id


async def main(args: argparse.Namespace) -> None:
    async with nerve.Broker(
        args.node_id, transport="tcp://127.0.0.1:0", peers=args.peer, services=[Work()],
        heartbeat_interval=args.heartbeat, heartbeat_timeout=args.heartbeat_timeout,
        graceful_stop_timeout=args.graceful,
    ) as broker:
        print(json.dumps({"nodeID": broker.node_id, "address": broker.address}), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--node-id", required=True)
    p.add_argument("--peer", action="append", default=[])
    p.add_argument("--heartbeat", type=float, default=0.2)
    p.add_argument("--heartbeat-timeout", type=float, default=1.5)
    p.add_argument("--graceful", type=float, default=10.0)
    trio.run(main, p.parse_args())
