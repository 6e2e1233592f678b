"""Real processes on loopback TCP: discovery from one seed, 1,000 concurrent calls, a node
killed with SIGKILL mid-call, a frozen node (heartbeat timeout), graceful stop, and peers
that send malformed frames or packets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import nerve
from nerve.errors import (
    NerveError,
    RequestRejectedError,
    ServiceNotFoundError,
)
from nerve.frames import FrameType, encode_frame

NODE = Path(__file__).with_name("cluster_node.py")
HEARTBEAT = dict(heartbeat_interval=0.2, heartbeat_timeout=1.5)


class Cluster:
    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.addresses: dict[str, str] = {}

    def start(self, node_id: str, *peers: str, graceful: float = 10.0) -> str:
        args = [sys.executable, str(NODE), "--node-id", node_id, "--graceful", str(graceful)]
        for p in peers:
            args += ["--peer", p]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE)
        self.procs[node_id] = proc
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = b""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"node {node_id} exited with {proc.returncode}")
        info = json.loads(line)
        self.addresses[node_id] = info["address"]
        return str(info["address"])

    def signal(self, node_id: str, sig: int) -> None:
        self.procs[node_id].send_signal(sig)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)
                    proc.terminate()
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.stop()


def three_nodes(cluster: Cluster) -> str:
    seed = cluster.start("n1")
    cluster.start("n2", seed)
    cluster.start("n3", cluster.addresses["n2"])  # knows only n2: learns n1 through it
    return seed


async def wait_nodes(broker: nerve.Broker, count: int, timeout: float = 15) -> None:
    with trio.fail_after(timeout):
        while True:
            eps = broker.registry.actions.get("work.echo", [])
            if len({ep.node_id for ep in eps}) >= count:
                return
            await trio.sleep(0.05)


def test_one_seed_is_enough_to_see_every_node(cluster: Cluster) -> None:
    seed = three_nodes(cluster)

    async def main() -> None:
        async with nerve.Broker("client", transport="tcp://127.0.0.1:0", peers=[seed], **HEARTBEAT) as b:
            await wait_nodes(b, 3)
            assert sorted(b.transport.connected()) == ["n1", "n2", "n3"]
            nodes = await b.call("$node.list", node_id="n3")
            # n3 was only given n2, yet sees everyone, us included.
            assert {n["id"] for n in nodes if n["available"]} == {"n1", "n2", "n3", "client"}

    trio.run(main)


def test_a_thousand_concurrent_calls_none_lost_or_duplicated(cluster: Cluster) -> None:
    seed = three_nodes(cluster)

    async def main() -> None:
        async with nerve.Broker("client", transport="tcp://127.0.0.1:0", peers=[seed], **HEARTBEAT) as b:
            await wait_nodes(b, 3)
            results: list[dict[str, Any]] = []

            async def one(i: int) -> None:
                results.append(await b.call("work.echo", {"i": i}, timeout=30))

            async with trio.open_nursery() as nursery:
                for i in range(1000):
                    nursery.start_soon(one, i)
            assert sorted(r["i"] for r in results) == list(range(1000))
            per_node = {n: sum(1 for r in results if r["node"] == n) for n in ("n1", "n2", "n3")}
            assert all(count > 200 for count in per_node.values()), per_node  # round-robin spread
            seen = [await b.call("work.seen_count", node_id=n) for n in ("n1", "n2", "n3")]
            assert sum(s["count"] for s in seen) == 1000
            assert sum(s["distinct"] for s in seen) == 1000
            assert [s["count"] for s in seen] == [per_node[n] for n in ("n1", "n2", "n3")]

    trio.run(main)


def test_sigkill_mid_call_fails_fast_and_retries_elsewhere(cluster: Cluster) -> None:
    seed = three_nodes(cluster)

    async def main() -> None:
        async with nerve.Broker("client", transport="tcp://127.0.0.1:0", peers=[seed], **HEARTBEAT) as b:
            await wait_nodes(b, 3)
            # 1. Without retries: the caller sees a retryable error well within the heartbeat timeout.
            async with trio.open_nursery() as nursery:
                outcome: dict[str, Any] = {}

                async def call() -> None:
                    start = trio.current_time()
                    try:
                        await b.call("work.slow", {"seconds": 30}, node_id="n3")
                    except NerveError as exc:
                        outcome["exc"] = exc
                    outcome["elapsed"] = trio.current_time() - start

                nursery.start_soon(call)
                await trio.sleep(0.3)
                cluster.signal("n3", signal.SIGKILL)
            exc = outcome["exc"]
            assert isinstance(exc, RequestRejectedError), exc
            assert exc.retryable
            assert outcome["elapsed"] < 1.5 + 1.0
            assert "n3" not in {ep.node_id for ep in b.registry.actions.get("work.slow", [])}

            # 2. With retries: the call that was on the killed node is retried on another node.
            started = trio.Event()
            answer: dict[str, Any] = {}

            async def retried() -> None:
                started.set()
                answer.update(await b.call("work.slow", {"seconds": 1.0}, retries=3))

            pids = {n: await b.call("work.pid", node_id=n) for n in ("n1", "n2")}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(retried)
                await started.wait()
                await trio.sleep(0.3)
                # Kill whichever node the first attempt went to (round-robin: we can't know,
                # so find the in-flight call's node through the transit's pending table).
                (pending,) = list(b.transit.pending.values())
                victim = pending.node_id
                os.kill(pids[victim], signal.SIGKILL)
            assert answer["node"] != victim and answer["node"] in pids

    trio.run(main)


def test_frames_queued_while_the_peer_stops_reading_all_arrive_in_order(cluster: Cluster) -> None:
    """64 calls of 768 KiB each (48 MiB, more than loopback socket buffers hold here: 4 MiB to
    send, at most 32 MiB to receive) go out while the node is stopped (SIGSTOP): the socket
    fills, so the eager writes from the calling tasks are cut short and the writer task sends
    the rest.
    Once the node runs again, every call gets its own payload back, byte for byte."""
    seed = cluster.start("n1")

    async def main() -> None:
        async with nerve.Broker("client", transport="tcp://127.0.0.1:0", peers=[seed]) as b:
            await wait_nodes(b, 1)
            results: dict[int, Any] = {}

            async def call(i: int) -> None:
                payload = {"i": i, "blob": bytes([i]) * (768 * 1024 - i)}
                results[i] = (await b.call("work.blob", payload)) == payload

            cluster.signal("n1", signal.SIGSTOP)
            try:
                async with trio.open_nursery() as nursery:
                    for i in range(64):
                        nursery.start_soon(call, i)
                    await trio.sleep(0.5)
                    conn = b.transport.connections["n1"]  # type: ignore[attr-defined]
                    assert conn._unsent or len(conn.encoder), "the socket never filled up"
                    cluster.signal("n1", signal.SIGCONT)
            finally:
                cluster.signal("n1", signal.SIGCONT)
            assert results == {i: True for i in range(64)}

    trio.run(main)


def test_frozen_node_is_lost_after_the_heartbeat_timeout(cluster: Cluster) -> None:
    seed = three_nodes(cluster)

    async def main() -> None:
        async with nerve.Broker("client", transport="tcp://127.0.0.1:0", peers=[seed], **HEARTBEAT) as b:
            await wait_nodes(b, 3)
            outcome: dict[str, Any] = {}

            async def call() -> None:
                start = trio.current_time()
                try:
                    await b.call("work.slow", {"seconds": 0.5}, node_id="n2")
                except NerveError as exc:
                    outcome["exc"] = exc
                outcome["elapsed"] = trio.current_time() - start

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await trio.sleep(0.1)
                cluster.signal("n2", signal.SIGSTOP)  # no EOF: only the silence tells
            assert isinstance(outcome.get("exc"), RequestRejectedError), outcome
            assert 1.5 <= outcome["elapsed"] < 1.5 + 1.5
            # The others keep serving.
            r = await b.call("work.echo", {"i": 1})
            assert r["node"] in ("n1", "n3")

    trio.run(main)


def test_graceful_stop_drains_in_flight_calls(cluster: Cluster) -> None:
    seed = three_nodes(cluster)

    async def main() -> None:
        async with nerve.Broker("client", transport="tcp://127.0.0.1:0", peers=[seed], **HEARTBEAT) as b:
            await wait_nodes(b, 3)
            result: dict[str, Any] = {}

            async def call() -> None:
                result.update(await b.call("work.slow", {"seconds": 1.0}, node_id="n3"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await trio.sleep(0.3)
                cluster.signal("n3", signal.SIGTERM)
            assert result["node"] == "n3"
            with trio.fail_after(5):
                while "n3" in {ep.node_id for ep in b.registry.actions.get("work.echo", [])}:
                    await trio.sleep(0.05)
            with pytest.raises(ServiceNotFoundError):
                await b.call("work.echo", {"i": 1}, node_id="n3")
            assert cluster.procs["n3"].wait(timeout=10) == 0

    trio.run(main)


def _hello(node_id: str) -> bytes:
    from nerve.transports.tcp import Hello, _hello_encoder

    return encode_frame(FrameType.HELLO, _hello_encoder.encode(
        Hello(node_id=node_id, address=None, window=1 << 20, max_chunk=1 << 16)))


@pytest.mark.parametrize("attack", ["garbage", "bad-checksum", "oversized", "bad-packet", "wrong-types"])
def test_malformed_input_disconnects_only_that_peer(cluster: Cluster, attack: str) -> None:
    seed = cluster.start("n1")
    host, port = seed.removeprefix("tcp://").split(":")

    async def main() -> None:
        async with nerve.Broker("client", transport="tcp://127.0.0.1:0", peers=[seed], **HEARTBEAT) as b:
            await wait_nodes(b, 1)
            sock = socket.create_connection((host, int(port)))
            sock.settimeout(5)
            if attack == "garbage":
                sock.sendall(os.urandom(64))
            else:
                sock.sendall(_hello("intruder"))
                await trio.sleep(0.2)
                if attack == "bad-checksum":
                    frame = bytearray(encode_frame(FrameType.REQUEST, b"\x80"))
                    frame[0] ^= 0xFF
                    sock.sendall(frame)
                elif attack == "oversized":
                    header = bytearray(encode_frame(FrameType.REQUEST, b""))
                    header[1:5] = (1 << 31).to_bytes(4, "big")
                    header[0] = header[1] ^ header[2] ^ header[3] ^ header[4] ^ header[5]
                    sock.sendall(header)
                elif attack == "bad-packet":
                    sock.sendall(encode_frame(FrameType.REQUEST, b"\xc1\xc1 not msgpack"))
                else:
                    import msgspec

                    sock.sendall(encode_frame(FrameType.REQUEST, msgspec.msgpack.encode(
                        {"ver": "5", "sender": "intruder", "id": 1, "action": ["x"]})))
            # The node closes the offending connection (a reset when it left bytes unread)...
            data = b""
            with trio.fail_after(5):
                while True:
                    try:
                        chunk = await trio.to_thread.run_sync(sock.recv, 65536)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    data += chunk
            sock.close()
            # ...and keeps serving everyone else.
            for i in range(20):
                assert (await b.call("work.echo", {"i": i}))["i"] == i
            assert "n1" in b.transport.connected()

    trio.run(main)
