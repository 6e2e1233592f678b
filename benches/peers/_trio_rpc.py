"""The RPC measurement loop of the trio-based peers (nerve and the raw trio echo): one loop, so
both are timed exactly alike. ``call(params)`` makes one call and returns its result."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from _common import PARAMS, mark, percentiles_us


async def measure_rpc(call: Callable[[Any], Awaitable[Any]], args: Any) -> dict[str, Any]:
    """Check one echo, warm up with ``args.warmup`` calls, then run ``args.inflight`` workers
    for ``args.duration`` seconds (or ``args.count`` calls), timing every call."""
    params = PARAMS
    echoed = await call(params)
    if echoed != params:
        raise SystemExit(f"echo returned {echoed!r}")
    warm = 0

    async def warm_worker() -> None:
        nonlocal warm
        while warm < args.warmup:
            warm += 1
            await call(params)

    async with trio.open_nursery() as nursery:
        for _ in range(args.inflight):
            nursery.start_soon(warm_worker)

    latencies: list[int] = []
    issued = 0
    stop_at = time.perf_counter() + args.duration
    clock = time.perf_counter_ns

    async def worker() -> None:
        nonlocal issued
        record = latencies.append
        while issued < args.count and time.perf_counter() < stop_at:
            issued += 1
            t0 = clock()
            await call(params)
            record(clock() - t0)

    cpu0 = mark("start")
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(args.inflight):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    return {"client_cpu_s": cpu, "calls": len(latencies), "seconds": elapsed,
            "req_per_s": len(latencies) / elapsed, **percentiles_us(latencies)}
