"""grpcio (grpc.aio) peer: generic handlers on raw bytes (no code generation), msgpack
bodies encoded and decoded with msgspec on both sides, one channel (one HTTP/2 connection).

Methods of ``/bench.Bench``: ``Echo`` (unary), ``Events`` (client streaming: one message per
event, the count comes back), ``Upload`` (client streaming of 1 MiB messages),
``Download`` (server streaming of 1 MiB messages). With ``--tls-dir``: TLS
(``ssl_server_credentials`` / ``ssl_channel_credentials``, the client checks the server).

    python benches/peers/grpc_peer.py server --port P
    python benches/peers/grpc_peer.py client --port P --scenario rpc --inflight 64 ...
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
import msgspec  # noqa: E402
from _common import (  # noqa: E402
    MIB,
    PARAMS,
    Pacer,
    chunk_source,
    idle_and_wait,
    mark,
    parser,
    percentiles_us,
    ready,
    result,
)

SERVICE = "bench.Bench"
OPTIONS = [("grpc.max_receive_message_length", 64 * MIB), ("grpc.max_send_message_length", 64 * MIB)]
encode, decode = msgspec.msgpack.encode, msgspec.msgpack.decode


# --- server -----------------------------------------------------------------------------

async def echo(request: bytes, context: Any) -> bytes:
    return encode(decode(request))


async def events(request_iterator: AsyncIterator[bytes], context: Any) -> bytes:
    n = 0
    async for msg in request_iterator:
        decode(msg)
        n += 1
    return encode(n)


async def upload(request_iterator: AsyncIterator[bytes], context: Any) -> bytes:
    n = 0
    async for msg in request_iterator:
        n += len(msg)
    return encode(n)


async def download(request: bytes, context: Any) -> AsyncIterator[bytes]:
    req = decode(request)
    block, full, rest = chunk_source(req["size"], req["chunk"])
    for _ in range(full):
        yield block
    if rest:
        yield block[:rest]


async def server(args: Any) -> None:
    srv = grpc.aio.server(options=OPTIONS)
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Events": grpc.stream_unary_rpc_method_handler(events),
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
        "Download": grpc.unary_stream_rpc_method_handler(download),
    }
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if args.tls_dir:
        d = Path(args.tls_dir)
        creds = grpc.ssl_server_credentials([((d / "server.key").read_bytes(), (d / "server.crt").read_bytes())])
        port = srv.add_secure_port(f"{args.host}:{args.port}", creds)
    else:
        port = srv.add_insecure_port(f"{args.host}:{args.port}")
    await srv.start()
    ready(port=port)
    try:
        await asyncio.wait_for(srv.wait_for_termination(), args.deadline)
    except TimeoutError:
        pass
    await srv.stop(0)


# --- client -----------------------------------------------------------------------------

async def rpc(channel: grpc.aio.Channel, args: Any) -> dict[str, Any]:
    call = channel.unary_unary(f"/{SERVICE}/Echo")
    params = PARAMS

    async def one() -> Any:
        return decode(await call(encode(params)))

    if await one() != params:
        raise SystemExit("echo mismatch")
    warm = 0

    async def warm_worker() -> None:
        nonlocal warm
        while warm < args.warmup:
            warm += 1
            await one()

    await asyncio.gather(*(warm_worker() for _ in range(args.inflight)))
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
            await one()
            record(clock() - t0)

    cpu0 = mark("start")
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.inflight)))
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    return {"client_cpu_s": cpu, "calls": len(latencies), "seconds": elapsed, "req_per_s": len(latencies) / elapsed,
            **percentiles_us(latencies)}


async def send_events(channel: grpc.aio.Channel, args: Any) -> dict[str, Any]:
    call = channel.stream_unary(f"/{SERVICE}/Events")

    async def gen(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield encode(PARAMS)

    warm = min(args.warmup, 1000)
    assert decode(await call(gen(warm))) == warm
    cpu0 = mark("start")
    start = time.perf_counter()
    got = decode(await call(gen(args.count)))
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    return {"client_cpu_s": cpu, "sent": args.count, "received": got, "lost": args.count - got, "seconds": elapsed,
            "events_per_s": got / elapsed}


async def do_upload(channel: grpc.aio.Channel, size: int, chunk: int) -> int:
    call = channel.stream_unary(f"/{SERVICE}/Upload")

    async def gen() -> AsyncIterator[bytes]:
        block, full, rest = chunk_source(size, chunk)
        for _ in range(full):
            yield block
        if rest:
            yield block[:rest]

    return decode(await call(gen()))


async def do_download(channel: grpc.aio.Channel, size: int, chunk: int, rate: float = 0.0) -> int:
    call = channel.unary_stream(f"/{SERVICE}/Download")
    got = 0
    pacer = Pacer(rate)
    async for msg in call(encode({"size": size, "chunk": chunk})):
        got += len(msg)
        if rate:
            delay = pacer.delay(got)
            if delay:
                await asyncio.sleep(delay)
    return got


async def transfer(channel: grpc.aio.Channel, args: Any) -> dict[str, Any]:
    chunk = args.chunk
    if args.scenario == "upload":
        assert await do_upload(channel, 4 * chunk, chunk) == 4 * chunk
    else:
        assert await do_download(channel, 4 * chunk, chunk) == 4 * chunk
    idle = idle_and_wait()
    cpu0 = mark("start")
    start = time.perf_counter()
    if args.scenario == "upload":
        got = await do_upload(channel, args.size, chunk)
    else:
        got = await do_download(channel, args.size, chunk, args.rate if args.scenario == "slow" else 0.0)
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    if got != args.size:
        raise SystemExit(f"{args.scenario}: {got} bytes, expected {args.size}")
    return {"client_cpu_s": cpu, "bytes": got, "seconds": elapsed, "mb_per_s": got / elapsed / 1e6,
            "client_rss_idle_kb": idle, "chunk": chunk}


async def client(args: Any) -> None:
    target = f"{args.host}:{args.port}"
    if args.tls_dir:  # server authentication only, like nerve's non-mutual TLS
        creds = grpc.ssl_channel_credentials(root_certificates=(Path(args.tls_dir) / "ca.pem").read_bytes())
        channel_cm = grpc.aio.secure_channel(target, creds, options=OPTIONS)
    else:
        channel_cm = grpc.aio.insecure_channel(target, options=OPTIONS)
    async with channel_cm as channel:
        await asyncio.wait_for(channel.channel_ready(), 15)
        if args.scenario == "rpc":
            coro = rpc(channel, args)
        elif args.scenario == "events":
            coro = send_events(channel, args)
        else:
            coro = transfer(channel, args)
        out = await asyncio.wait_for(coro, args.deadline)
    result(**out)


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    asyncio.run(server(args) if args.mode == "server" else client(args))


if __name__ == "__main__":
    main()
