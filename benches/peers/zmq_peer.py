"""pyzmq peer: ROUTER server, DEALER client (one TCP connection), plain blocking zmq API,
msgpack bodies via msgspec, zmq's default high-water marks (1000 messages per queue).

Messages are ``[kind, body]`` (``[identity, kind, body]`` at the ROUTER). RPC with N in flight
is a pipelined DEALER keeping N requests outstanding; transfers are 1 MiB messages sent
zero-copy; the ROUTER is set to ROUTER_MANDATORY so that a full queue blocks instead of
dropping.

    python benches/peers/zmq_peer.py server --port P
    python benches/peers/zmq_peer.py client --port P --scenario rpc --inflight 64 ...
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec  # noqa: E402
import zmq  # noqa: E402
from _common import (  # noqa: E402
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

encode, decode = msgspec.msgpack.encode, msgspec.msgpack.decode


def server(args: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, int(args.deadline * 1000))  # a blocked send gives up too
    if args.port:
        sock.bind(f"tcp://{args.host}:{args.port}")
        port = args.port
    else:
        port = sock.bind_to_random_port(f"tcp://{args.host}")
    ready(port=port)
    deadline = time.monotonic() + args.deadline
    events = 0
    uploaded = 0
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while time.monotonic() < deadline:
        if not poller.poll(200):
            continue
        while True:
            try:
                ident, kind, body = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            k = kind.bytes
            if k == b"R":
                i, params = decode(body.buffer)
                sock.send_multipart([ident, b"r", encode([i, params])])
            elif k == b"E":
                decode(body.buffer)
                events += 1
            elif k == b"U":
                uploaded += len(body)
            elif k == b"C":
                sock.send_multipart([ident, b"c", encode(events)])
            elif k == b"X":
                sock.send_multipart([ident, b"x", encode(uploaded)])
                uploaded = 0
            elif k == b"D":
                req = decode(body.buffer)
                block, full, rest = chunk_source(req["size"], req["chunk"])
                for _ in range(full):
                    sock.send_multipart([ident, b"d", block], copy=False)
                if rest:
                    sock.send_multipart([ident, b"d", block[:rest]], copy=False)
                sock.send_multipart([ident, b"z", b""])
    sock.close(0)
    ctx.term()


def rpc(sock: zmq.Socket, args: Any) -> dict[str, Any]:
    params = PARAMS
    sock.send_multipart([b"R", encode([0, params])])
    _, body = sock.recv_multipart()
    if decode(body)[1] != params:
        raise SystemExit("echo mismatch")

    def run(total: int, duration: float, record: Any) -> int:
        sent: dict[int, int] = {}
        next_id = 1
        done = 0
        clock = time.perf_counter_ns
        stop_at = time.perf_counter() + duration
        for _ in range(min(args.inflight, total)):
            sent[next_id] = clock()
            sock.send_multipart([b"R", encode([next_id, params])])
            next_id += 1
        while sent:
            _, body = sock.recv_multipart()
            i, _data = decode(body)
            record(clock() - sent.pop(i))
            done += 1
            if next_id <= total and time.perf_counter() < stop_at:
                sent[next_id] = clock()
                sock.send_multipart([b"R", encode([next_id, params])])
                next_id += 1
        return done

    run(args.warmup, 60.0, lambda _: None)
    latencies: list[int] = []
    cpu0 = mark("start")
    start = time.perf_counter()
    done = run(args.count, args.duration, latencies.append)
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    return {"client_cpu_s": cpu, "calls": done, "seconds": elapsed, "req_per_s": done / elapsed,
            **percentiles_us(latencies)}


def wait_count(sock: zmq.Socket, expected: int, idle_timeout: float = 10.0) -> int:
    last, last_change = -1, time.perf_counter()
    while True:
        sock.send_multipart([b"C", b""])
        _, body = sock.recv_multipart()
        got = decode(body)
        if got >= expected:
            return got
        now = time.perf_counter()
        if got != last:
            last, last_change = got, now
        elif now - last_change > idle_timeout:
            return got
        time.sleep(0.002)


def events(sock: zmq.Socket, args: Any) -> dict[str, Any]:
    warm = min(args.warmup, 1000)
    for _ in range(warm):
        sock.send_multipart([b"E", encode(PARAMS)])
    wait_count(sock, warm)
    cpu0 = mark("start")
    start = time.perf_counter()
    for _ in range(args.count):
        sock.send_multipart([b"E", encode(PARAMS)])
    sent_s = time.perf_counter() - start
    got = wait_count(sock, warm + args.count) - warm
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    return {"client_cpu_s": cpu, "sent": args.count, "received": got, "lost": args.count - got, "seconds": elapsed,
            "send_seconds": sent_s, "events_per_s": got / elapsed}


def upload(sock: zmq.Socket, size: int, chunk: int) -> int:
    block, full, rest = chunk_source(size, chunk)
    for _ in range(full):
        sock.send_multipart([b"U", block], copy=False)
    if rest:
        sock.send_multipart([b"U", block[:rest]], copy=False)
    sock.send_multipart([b"X", b""])
    _, body = sock.recv_multipart()
    return decode(body)


def download(sock: zmq.Socket, size: int, chunk: int, rate: float = 0.0) -> int:
    sock.send_multipart([b"D", encode({"size": size, "chunk": chunk})])
    got = 0
    pacer = Pacer(rate)
    while True:
        kind, body = sock.recv_multipart(copy=False)
        if kind.bytes == b"z":
            return got
        got += len(body)
        if rate:
            delay = pacer.delay(got)
            if delay:
                time.sleep(delay)


def transfer(sock: zmq.Socket, args: Any) -> dict[str, Any]:
    chunk = args.chunk
    if args.scenario == "upload":
        assert upload(sock, 4 * chunk, chunk) == 4 * chunk
    else:
        assert download(sock, 4 * chunk, chunk) == 4 * chunk
    idle = idle_and_wait()
    cpu0 = mark("start")
    start = time.perf_counter()
    if args.scenario == "upload":
        got = upload(sock, args.size, chunk)
    else:
        got = download(sock, args.size, chunk, args.rate if args.scenario == "slow" else 0.0)
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    if got != args.size:
        raise SystemExit(f"{args.scenario}: {got} bytes, expected {args.size}")
    return {"client_cpu_s": cpu, "bytes": got, "seconds": elapsed, "mb_per_s": got / elapsed / 1e6,
            "client_rss_idle_kb": idle, "chunk": chunk}


def client(args: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    timeout_ms = int(args.deadline * 1000)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
    sock.connect(f"tcp://{args.host}:{args.port}")
    try:
        if args.scenario == "rpc":
            out = rpc(sock, args)
        elif args.scenario == "events":
            out = events(sock, args)
        else:
            out = transfer(sock, args)
    except zmq.Again:
        raise SystemExit(f"zmq peer: no answer within {args.deadline}s") from None
    sock.close(0)
    ctx.term()
    result(**out)


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    (server if args.mode == "server" else client)(args)


if __name__ == "__main__":
    main()
