"""The floor of Python on trio: a length-prefixed msgspec protocol with no broker at all.

Frames are ``[u32 big-endian body length][u8 kind][body]``. Each connection end has a reader
task (parses frames out of ``receive_some``) and a batching writer task (everything queued
since its last wake-up goes out in one ``send_all``), which is nerve's TCP architecture without
the broker. Requests and events are msgpack (msgspec Structs); transfer chunks are raw bytes.
Also ``--scenario inproc``: a bare ``await handler(ctx)`` plus a msgspec round trip of the
params, the baseline of nerve's in-process call cost.

    python benches/peers/raw_trio.py server --port P
    python benches/peers/raw_trio.py client --port P --scenario rpc --inflight 64 ...
"""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec  # noqa: E402
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

REQ, RES, EVENT, COUNT, COUNT_RES, DATA, DATA_END, UPLOAD_RES, DOWNLOAD = range(1, 10)
HEADER = struct.Struct(">IB")
HIGH_WATER = 4 * 1024 * 1024
RECV_SIZE = 256 * 1024


class Req(msgspec.Struct, array_like=True):
    id: int
    params: Any


class Res(msgspec.Struct, array_like=True):
    id: int
    data: Any


class DownloadReq(msgspec.Struct, array_like=True):
    size: int
    chunk: int


_enc = msgspec.msgpack.Encoder()
_dec_req = msgspec.msgpack.Decoder(Req)
_dec_res = msgspec.msgpack.Decoder(Res)
_dec_any = msgspec.msgpack.Decoder()


class Conn:
    """One end of a connection: frame parsing, and a batching writer with a high-water mark."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.out = bytearray()
        self.wakeup = trio.Event()
        self.drained = trio.Event()
        self.drained.set()

    def send(self, kind: int, body: bytes | bytearray | memoryview) -> None:
        out = self.out
        out += HEADER.pack(len(body), kind)
        out += body
        self.wakeup.set()
        if len(out) > HIGH_WATER and self.drained.is_set():
            self.drained = trio.Event()

    async def wait_writable(self) -> None:
        if len(self.out) > HIGH_WATER:
            await self.drained.wait()
        else:
            await trio.lowlevel.checkpoint()

    async def writer(self) -> None:
        while True:
            if not self.out:
                self.wakeup = trio.Event()
                await self.wakeup.wait()
                continue
            data, self.out = self.out, bytearray()
            self.drained.set()
            await self.stream.send_all(data)

    async def frames(self, on_frame: Any) -> None:
        """Read until EOF, calling ``on_frame(kind, memoryview body)`` for each frame."""
        buf = bytearray()
        receive = self.stream.receive_some
        unpack = HEADER.unpack_from
        while True:
            data = await receive(RECV_SIZE)
            if not data:
                return
            buf += data
            pos, end = 0, len(buf)
            view = memoryview(buf)
            try:
                while end - pos >= 5:
                    length, kind = unpack(buf, pos)
                    if end - pos - 5 < length:
                        break
                    r = on_frame(kind, view[pos + 5:pos + 5 + length])
                    if r is not None:
                        await r
                    pos += 5 + length
            finally:
                view.release()
            if pos:
                del buf[:pos]


# --- server -----------------------------------------------------------------------------

class ServerState:
    events = 0


async def handle(stream: trio.SocketStream) -> None:
    conn = Conn(stream)
    uploaded = 0

    async def produce(req: DownloadReq) -> None:
        block, full, rest = chunk_source(req.size, req.chunk)
        for _ in range(full):
            conn.send(DATA, block)
            await conn.wait_writable()
        if rest:
            conn.send(DATA, block[:rest])
        conn.send(DATA_END, b"")

    async with trio.open_nursery() as nursery:
        def on_frame(kind: int, body: memoryview) -> None:
            nonlocal uploaded
            if kind == DATA:
                uploaded += len(body)
            elif kind == REQ:
                req = _dec_req.decode(body)
                conn.send(RES, _enc.encode(Res(req.id, req.params)))
            elif kind == EVENT:
                _dec_any.decode(body)
                ServerState.events += 1
            elif kind == COUNT:
                conn.send(COUNT_RES, _enc.encode(ServerState.events))
            elif kind == DATA_END:
                conn.send(UPLOAD_RES, _enc.encode(uploaded))
                uploaded = 0
            elif kind == DOWNLOAD:
                nursery.start_soon(produce, msgspec.msgpack.decode(body, type=DownloadReq))

        nursery.start_soon(conn.writer)
        try:
            await conn.frames(on_frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        nursery.cancel_scope.cancel()


async def server(args: Any) -> None:
    with trio.move_on_after(args.deadline):
        listeners = await trio.open_tcp_listeners(args.port, host=args.host)
        ready(port=listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners)


# --- client -----------------------------------------------------------------------------

class Client:
    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.next_id = 0
        self.waiting: dict[int, list[Any]] = {}
        self.replies: dict[int, trio.Event] = {}
        self.value: Any = None
        self.value_ready = trio.Event()
        self.data_sink: Any = None

    def on_frame(self, kind: int, body: memoryview) -> Any:
        if kind == RES:
            res = _dec_res.decode(body)
            slot = self.waiting.pop(res.id)
            slot[1] = res.data
            slot[0].set()
        elif kind == DATA:
            return self.data_sink(len(body))
        elif kind in (COUNT_RES, UPLOAD_RES):
            self.value = _dec_any.decode(body)
            self.value_ready.set()
        elif kind == DATA_END:
            self.value = "end"
            self.value_ready.set()
        return None

    async def call(self, params: Any) -> Any:
        self.next_id += 1
        i = self.next_id
        slot: list[Any] = [trio.Event(), None]
        self.waiting[i] = slot
        self.conn.send(REQ, _enc.encode(Req(i, params)))
        await slot[0].wait()
        return slot[1]

    async def request_value(self, kind: int, body: bytes = b"") -> Any:
        self.value_ready = trio.Event()
        self.conn.send(kind, body)
        await self.value_ready.wait()
        return self.value


async def rpc(cl: Client, args: Any) -> dict[str, Any]:
    if not args.timeout:
        return await measure_rpc(cl.call, args)
    # No deadline travels in this protocol: a timeout is the caller's own cancel scope, as a
    # trio user would write it.
    timeout = args.timeout

    async def call(params: Any) -> Any:
        with trio.fail_after(timeout):
            return await cl.call(params)

    return await measure_rpc(call, args)


async def events(cl: Client, args: Any) -> dict[str, Any]:
    conn = cl.conn
    body = _enc.encode(PARAMS)
    warm = min(args.warmup, 1000)
    for _ in range(warm):
        conn.send(EVENT, _enc.encode(PARAMS))
        await conn.wait_writable()
    await _wait_count(cl, warm)
    cpu0 = mark("start")
    start = time.perf_counter()
    for _ in range(args.count):
        body = _enc.encode(PARAMS)  # encode per event, as a broker would
        conn.send(EVENT, body)
        await conn.wait_writable()
    sent_s = time.perf_counter() - start
    got = await _wait_count(cl, warm + args.count) - warm
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    return {"client_cpu_s": cpu, "sent": args.count, "received": got, "lost": args.count - got, "seconds": elapsed,
            "send_seconds": sent_s, "events_per_s": got / elapsed}


async def _wait_count(cl: Client, expected: int, idle_timeout: float = 10.0) -> int:
    last, last_change = -1, time.perf_counter()
    while True:
        got = await cl.request_value(COUNT)
        if got >= expected:
            return got
        now = time.perf_counter()
        if got != last:
            last, last_change = got, now
        elif now - last_change > idle_timeout:
            return got
        await trio.sleep(0.002)


async def upload(cl: Client, args: Any, size: int) -> int:
    conn = cl.conn
    block, full, rest = chunk_source(size, args.chunk)
    for _ in range(full):
        conn.send(DATA, block)
        await conn.wait_writable()
    if rest:
        conn.send(DATA, block[:rest])
    return await cl.request_value(DATA_END)


async def download(cl: Client, args: Any, size: int, rate: float = 0.0) -> int:
    got = 0
    pacer = Pacer(rate)

    def count(n: int) -> Any:
        nonlocal got
        got += n
        if rate:
            delay = pacer.delay(got)
            if delay:
                return trio.sleep(delay)  # the reader task sleeps: nothing more is read
        return None

    cl.data_sink = count
    end = await cl.request_value(DOWNLOAD, _enc.encode(DownloadReq(size, args.chunk)))
    assert end == "end"
    return got


async def transfer(cl: Client, args: Any) -> dict[str, Any]:
    warm = 4 * args.chunk
    if args.scenario == "upload":
        assert await upload(cl, args, warm) == warm
    else:
        assert await download(cl, args, warm) == warm
    idle = idle_and_wait()
    cpu0 = mark("start")
    start = time.perf_counter()
    if args.scenario == "upload":
        got = await upload(cl, args, args.size)
    else:
        got = await download(cl, args, args.size, args.rate if args.scenario == "slow" else 0.0)
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    if got != args.size:
        raise SystemExit(f"{args.scenario}: {got} bytes, expected {args.size}")
    return {"client_cpu_s": cpu, "bytes": got, "seconds": elapsed, "mb_per_s": got / elapsed / 1e6,
            "client_rss_idle_kb": idle, "window": HIGH_WATER, "chunk": args.chunk}


class _Ctx:
    __slots__ = ("params",)

    def __init__(self, params: Any) -> None:
        self.params = params


class _Echo:
    async def echo(self, ctx: _Ctx) -> Any:
        return ctx.params


async def inproc(args: Any) -> dict[str, Any]:
    """``await handler(ctx)`` plus a msgspec round trip of the params: what any call costs."""
    handler = _Echo().echo
    encode, decode = msgspec.msgpack.encode, msgspec.msgpack.decode
    params = PARAMS
    for _ in range(args.warmup):
        await handler(_Ctx(decode(encode(params))))
    n = args.count
    start = time.perf_counter_ns()
    for _ in range(n):
        await handler(_Ctx(decode(encode(params))))
    elapsed = time.perf_counter_ns() - start
    return {"calls": n, "seconds": elapsed / 1e9, "ns_per_call": elapsed / n}


async def client(args: Any) -> None:
    if args.scenario == "inproc":
        result(**await inproc(args))
        return
    arm_deadline(args.deadline)
    stream = await trio.open_tcp_stream(args.host, args.port)
    conn = Conn(stream)
    cl = Client(conn)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.writer)
        nursery.start_soon(conn.frames, cl.on_frame)
        if args.scenario == "rpc":
            out = await rpc(cl, args)
        elif args.scenario == "events":
            out = await events(cl, args)
        else:
            out = await transfer(cl, args)
        nursery.cancel_scope.cancel()
    await stream.aclose()
    result(**out)


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    trio.run(server if args.mode == "server" else client, args)


if __name__ == "__main__":
    main()
