"""Hostile peers (issue 9): each test plays a peer that breaks the rules over a real loopback
TCP socket (``tests/hostile.py`` speaks nerve's framing and handshake by hand) against a real
node in its own process (``tests/hostile_target.py``), while a legitimate ``nerve.Broker``
alongside must keep working. DESIGN.md section 6: anything a peer's bytes cause ends that
peer's connection, never the node nor another connection; limits hold per peer; with a shared
secret no frame is processed before the peer has proved it.

Every test is bounded (``trio.fail_after`` / pytest-timeout) and kills what it started.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import trio

import nerve
from nerve.errors import NerveError, QueueIsFullError
from nerve.frames import STREAM_FLAG_END, STREAM_FLAG_RESPONSE, FrameEncoder, FrameType, encode_frame
from hostile import BAD_UTF8, CHUNK_SIZE, Closed, Hostile, Node, hello_fields, pack

pytestmark = pytest.mark.timeout(60)

HEARTBEAT = dict(heartbeat_interval=0.2, heartbeat_timeout=3.0)
REQ, RES, EVENT, INFO = (int(FrameType.REQUEST), int(FrameType.RESPONSE), int(FrameType.EVENT),
                         int(FrameType.INFO))
PEERS, HELLO, HELLO_ACK = int(FrameType.PEERS), int(FrameType.HELLO), int(FrameType.HELLO_ACK)
STREAM_DATA, PING, PONG = int(FrameType.STREAM_DATA), int(FrameType.PING), int(FrameType.PONG)
HEARTBEAT_FRAME = int(FrameType.HEARTBEAT)
MiB = 1 << 20


@pytest.fixture
def spawn() -> Iterator[Callable[..., Node]]:
    """Start target nodes; every one is stopped (killed if frozen) at the end."""
    nodes: list[Node] = []

    def start(node_id: str, **kw: Any) -> Node:
        node = Node(node_id, **kw)
        nodes.append(node)
        return node

    try:
        yield start
    finally:
        for node in nodes:
            node.stop()


def legit(*nodes: Node, **kw: Any) -> nerve.Broker:
    opts: dict[str, Any] = dict(HEARTBEAT)
    opts.update(kw)
    return nerve.Broker("legit", transport="tcp://127.0.0.1:0", peers=[n.address for n in nodes], **opts)


async def wait_node(b: nerve.Broker, node: Node, timeout: float = 10) -> None:
    """Until ``node``'s service ``t`` is known to ``b``."""
    with trio.fail_after(timeout):
        while not any(ep.node_id == node.node_id for ep in b.registry.actions.get("t.echo", [])):
            await trio.sleep(0.02)


async def still_serving(b: nerve.Broker, node: Node, calls: int = 5) -> None:
    """``node`` is alive and answers ``b`` promptly."""
    assert node.alive(), node.why_dead()
    for i in range(calls):
        try:
            with trio.fail_after(3):
                assert await b.call("t.echo", {"i": i}, node_id=node.node_id, timeout=2.5) == {"i": i}
        except (NerveError, trio.TooSlowError) as exc:
            with trio.move_on_after(1):
                while node.alive():
                    await trio.sleep(0.05)
            raise AssertionError(f"{node.node_id} does not answer ({exc!r}); {node.state()}") from exc
    assert node.alive(), node.why_dead()


async def stats(b: nerve.Broker, node: Node) -> dict[str, Any]:
    with trio.fail_after(3):
        return await b.call("t.stats", node_id=node.node_id, timeout=2.5)  # type: ignore[no-any-return]


def payload(seed: int, size: int = MiB) -> tuple[bytes, str]:
    block = hashlib.sha256(str(seed).encode()).digest() * (CHUNK_SIZE // 32)
    data = (block * (size // len(block) + 1))[:size]
    return data, hashlib.sha256(data).hexdigest()


def request(call_id: str, action: str, params: Any = None, **kw: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"id": call_id, "action": action, "params": params if params is not None else {},
                              "meta": {}, "timeout": 0, "level": 1, "requestID": call_id}
    fields.update(kw)
    return fields


# --- 1. invalid UTF-8 ---------------------------------------------------------------------


@pytest.mark.parametrize("field", ["nodeID", "namespace", "address"])
def test_non_utf8_string_in_hello_does_not_end_a_node_with_a_secret(spawn: Callable[..., Node], field: str) -> None:
    """Before authentication: a HELLO field that is not UTF-8 ends that connection only. With
    msgspec 0.19 (the declared minimum) decoding raises UnicodeDecodeError, a ValueError the
    handshake did not catch, and the node died; msgspec 0.23 raises DecodeError instead."""
    node = spawn("utf8-hello", secret="s3cret")

    async def main() -> None:
        with trio.fail_after(30):
            async with legit(node, secret="s3cret") as b:
                await wait_node(b, node)
                h = await Hostile.connect(node.address)
                fields = hello_fields("intruder", auth=True, nonce=os.urandom(16))
                fields[field] = BAD_UTF8
                await h.send(HELLO, pack(fields))
                assert await h.closed_by_peer(5), "the node kept a connection whose HELLO is not UTF-8"
                await still_serving(b, node)

    trio.run(main)


BAD_PACKETS = {
    "INFO": (INFO, {"services": [{"name": BAD_UTF8, "actions": {}, "events": {}}], "hostname": BAD_UTF8}),
    "REQ": (REQ, request("r1", "t.echo", {"text": BAD_UTF8})),
    "EVENT": (EVENT, {"event": BAD_UTF8, "data": {}, "groups": ["t"]}),
}


@pytest.mark.parametrize("kind", list(BAD_PACKETS))
def test_non_utf8_string_after_the_handshake_ends_only_that_connection(spawn: Callable[..., Node], kind: str) -> None:
    """Without a secret, after the handshake: the serializer caught only msgspec.DecodeError,
    so under msgspec 0.19 the UnicodeDecodeError of a packet ended the node."""
    node = spawn("utf8-packet")

    async def main() -> None:
        with trio.fail_after(30):
            async with legit(node) as b:
                await wait_node(b, node)
                h = await Hostile.connect(node.address)
                await h.handshake()
                frame_type, fields = BAD_PACKETS[kind]
                await h.send_packet(frame_type, fields)
                assert await h.closed_by_peer(5), f"the node kept a connection after a non-UTF-8 {kind}"
                await still_serving(b, node)

    trio.run(main)


# --- 2. addresses that do not parse -----------------------------------------------------

BAD_ADDRESSES = ["tcp://127.0.0.1:99999", "tcp://[::1"]


@pytest.mark.parametrize("address", BAD_ADDRESSES, ids=["port-99999", "unclosed-bracket"])
def test_peers_naming_an_unparsable_address_does_not_end_the_node(spawn: Callable[..., Node], address: str) -> None:
    """parse_address raises ValueError (urllib) for these, not BrokerOptionsError."""
    node = spawn("peers-target")

    async def main() -> None:
        with trio.fail_after(30):
            async with legit(node) as b:
                await wait_node(b, node)
                h = await Hostile.connect(node.address)
                await h.handshake()
                await h.send(PEERS, pack({"nodes": {"ghost": address}}))
                await h.send_packet(PING, {"time": 1, "id": "after-peers"})
                try:  # the node answers the PING (it got past the PEERS) or drops us
                    with trio.fail_after(3):
                        await h.next_frame((PONG,))
                except Closed:
                    pass
                await still_serving(b, node)

    trio.run(main)


@pytest.mark.parametrize("address", BAD_ADDRESSES, ids=["port-99999", "unclosed-bracket"])
def test_unparsable_address_in_hello_is_neither_relayed_nor_redialed(spawn: Callable[..., Node], address: str) -> None:
    """A HELLO ``address`` was taken as is, relayed to every connected node in PEERS (each of
    them died parsing it) and redialed after a non-graceful close (parse_address outside a try:
    the node itself died)."""
    n1 = spawn("relay-n1")
    n2 = spawn("relay-n2", peers=(n1.address,))

    async def main() -> None:
        with trio.fail_after(40):
            async with legit(n1) as b:  # sees n1 and n2 connected, then leaves
                await wait_node(b, n1)
                await wait_node(b, n2)
            h = await Hostile.connect(n1.address)
            try:
                await h.handshake(address=address)
                # n1 sends PEERS to everyone when a connection is made: wait for ours, so
                # the relay to n2 has happened too.
                with trio.fail_after(3):
                    await h.next_frame((PEERS,))
            except Closed:
                pass  # refusing such a HELLO is fine
            await trio.sleep(0.3)
            await h.aclose()  # not graceful: n1 would redial the address
            await trio.sleep(1.0)
            dead = [node.why_dead() for node in (n1, n2) if not node.alive()]
            assert not dead, f"n1 redials the address, n2 had it in PEERS: {dead}"
            async with legit(n1) as b:
                await wait_node(b, n1)
                await wait_node(b, n2)
                await still_serving(b, n1)
                await still_serving(b, n2)

    trio.run(main)


# --- 3. a stream chunk out of order -----------------------------------------------------


def test_stream_data_out_of_order_on_a_request_stream_does_not_freeze_the_node(spawn: Callable[..., Node]) -> None:
    """seq 1 before seq 0: the reader's wait returned at once (data buffered, none ready)
    and the handler spun without a checkpoint, the node at 100% CPU forever."""
    node = spawn("ooo-request")

    async def main() -> None:
        with trio.fail_after(30):
            async with legit(node) as b:
                await wait_node(b, node)
                h = await Hostile.connect(node.address)
                await h.handshake()
                await h.send_packet(REQ, request("up-1", "t.upload", stream=True))
                await h.send_stream_data(0, "up-1", 1, b"x" * 1000)
                await trio.sleep(0.3)
                await still_serving(b, node)

    trio.run(main)


def test_stream_data_out_of_order_from_a_hostile_server_does_not_freeze_the_caller(spawn: Callable[..., Node]) -> None:
    """The same from a hostile *server*: the victim node calls it (``t.relay``) and reads the
    response stream, which starts at seq 1."""

    async def main() -> None:
        with trio.fail_after(40):
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            victim = spawn("ooo-victim", peers=(f"tcp://127.0.0.1:{port}",))
            server = Hostile(await listeners[0].accept(), node_id="evil")
            hello = await server.next_frame((HELLO,))
            assert msgspec.msgpack.decode(hello[1])["nodeID"] == "ooo-victim"
            await server.send(HELLO_ACK, pack(hello_fields("evil")))
            await server.send_packet(INFO, {"services": [{"name": "evil", "actions": {
                "evil.download": {"name": "evil.download"}}, "events": {}}], "instanceID": "evil-1", "seq": 1})
            async with legit(victim) as b, trio.open_nursery() as nursery:
                await wait_node(b, victim)

                async def relay() -> None:
                    with trio.move_on_after(20):
                        try:
                            await b.call("t.relay", {"action": "evil.download"}, node_id=victim.node_id)
                        except NerveError:
                            pass

                nursery.start_soon(relay)
                req = await server.next_frame((REQ,))
                call_id = msgspec.msgpack.decode(req[1])["id"]
                await server.send_packet(RES, {"id": call_id, "success": True, "data": None, "meta": {},
                                               "stream": True, "seq": 0})
                await server.send_stream_data(STREAM_FLAG_RESPONSE, call_id, 1, b"y" * 1000)
                await trio.sleep(0.3)
                await still_serving(b, victim)
                nursery.cancel_scope.cancel()
            await server.aclose()
            for listener in listeners:
                await listener.aclose()

    trio.run(main)


# --- 4. many concurrent streams on one connection ---------------------------------------

STREAMS = 300
STREAMS_TIMEOUT = 20


def test_300_concurrent_uploads_on_one_connection_all_complete(spawn: Callable[..., Node]) -> None:
    """Each producer queued a chunk before waiting for the write queue: 300 x 256 KiB went
    past max_write_queue and the connection was dropped as "not reading"."""
    node = spawn("uploads")

    async def main() -> None:
        done: dict[int, bool] = {}
        errors: list[str] = []
        with trio.fail_after(STREAMS_TIMEOUT + 15):
            async with legit(node) as b:
                await wait_node(b, node)

                async def upload(i: int) -> None:
                    data, sha = payload(i)

                    async def chunks() -> Any:
                        for at in range(0, len(data), CHUNK_SIZE):
                            yield data[at:at + CHUNK_SIZE]

                    try:
                        result = await b.call("t.upload", stream=nerve.PacketStream.from_iterable(chunks()),
                                              node_id=node.node_id)
                    except NerveError as exc:
                        errors.append(repr(exc))
                        return
                    done[i] = result == {"size": len(data), "sha256": sha}

                with trio.move_on_after(STREAMS_TIMEOUT):
                    async with trio.open_nursery() as nursery:
                        for i in range(STREAMS):
                            nursery.start_soon(upload, i)
                assert not errors and len(done) == STREAMS, \
                    f"{len(done)}/{STREAMS} uploads completed, {len(errors)} failed, the rest still running " \
                    f"after {STREAMS_TIMEOUT} s; first error: {errors[:1]}"
                assert len(done) == STREAMS and all(done.values())
                await still_serving(b, node)

    trio.run(main)


def test_300_concurrent_downloads_on_one_connection_all_complete(spawn: Callable[..., Node]) -> None:
    node = spawn("downloads")

    async def main() -> None:
        done: dict[int, bool] = {}
        errors: list[str] = []
        with trio.fail_after(STREAMS_TIMEOUT + 15):
            async with legit(node) as b:
                await wait_node(b, node)

                async def download(i: int) -> None:
                    _, sha = payload(i)
                    try:
                        stream = await b.call("t.download", {"size": MiB, "seed": i}, node_id=node.node_id)
                        h = hashlib.sha256()
                        async for chunk in stream:
                            h.update(chunk)
                    except NerveError as exc:
                        errors.append(repr(exc))
                        return
                    done[i] = h.hexdigest() == sha

                with trio.move_on_after(STREAMS_TIMEOUT):
                    async with trio.open_nursery() as nursery:
                        for i in range(STREAMS):
                            nursery.start_soon(download, i)
                assert not errors and len(done) == STREAMS, \
                    f"{len(done)}/{STREAMS} downloads completed, {len(errors)} failed, the rest still running " \
                    f"after {STREAMS_TIMEOUT} s; first error: {errors[:1]}"
                assert len(done) == STREAMS and all(done.values())
                await still_serving(b, node)

    trio.run(main)


# --- 5. per-peer limits -----------------------------------------------------------------


def test_one_peer_holding_10000_requests_does_not_fill_the_queue_for_another(spawn: Callable[..., Node]) -> None:
    """max_pending_requests (10,000) was one pool for all peers: a peer holding them all made
    everyone else's calls fail with QueueIsFullError. Now each peer gets a fair share
    (max_peer_requests=None)."""
    node = spawn("requests")

    async def main() -> None:
        with trio.fail_after(40):
            async with legit(node) as b:
                await wait_node(b, node)
                h = await Hostile.connect(node.address)
                await h.handshake()
                wave = b"".join(encode_frame(REQ, pack({"ver": "5", "sender": "intruder",
                                                        **request(f"hold-{i}", "t.hold", {"seconds": 30})}))
                                for i in range(10_000))
                await h.send_raw(wave)
                await h.send_packet(PING, {"time": 1, "id": "after-wave"})
                with trio.fail_after(15):  # every REQ before the PING has been admitted or refused
                    await h.next_frame((PONG,))
                refused: list[BaseException] = []
                for i in range(20):
                    try:
                        with trio.fail_after(3):
                            await b.call("t.echo", {"i": i}, node_id=node.node_id, timeout=2.5)
                    except QueueIsFullError as exc:
                        refused.append(exc)
                assert not refused, f"{len(refused)}/20 calls of a second peer refused: {refused[0]}"
                await h.aclose()

    trio.run(main)


def test_a_peer_cannot_open_more_than_max_peer_streams(spawn: Callable[..., Node]) -> None:
    """New API: max_peer_streams, advertised in HELLO as maxStreams; a stream REQ beyond it
    is answered QueueIsFullError (429) and its chunks are not kept. A peer that fills the
    window of many streams pins at most max_peer_streams x stream_window."""
    window = MiB
    node = spawn("streams", opts={"max_peer_streams": 4, "stream_window": window, "max_chunk": CHUNK_SIZE})

    async def main() -> None:
        with trio.fail_after(30):
            async with legit(node) as b:
                await wait_node(b, node)
                h = await Hostile.connect(node.address)
                ack = await h.handshake()
                assert ack.get("maxStreams") == 4, ack
                for i in range(12):
                    await h.send_packet(REQ, request(f"park-{i}", "t.park", stream=True))
                    for seq in range(window // CHUNK_SIZE):
                        await h.send_stream_data(0, f"park-{i}", seq, b"z" * CHUNK_SIZE)
                codes: list[Any] = []
                with trio.move_on_after(3):
                    while len(codes) < 8:
                        frame = await h.next_frame((RES,))
                        res = msgspec.msgpack.decode(frame[1])
                        codes.append((res.get("error") or {}).get("code"))
                assert codes == [429] * 8, f"answers to 12 stream REQs (limit 4): {codes}"
                s = await stats(b, node)
                assert s["parked"] == 4, s
                assert s["parked_buffered"] <= 4 * (window + CHUNK_SIZE), s
                await still_serving(b, node)

    trio.run(main)


def test_stream_handlers_of_a_gone_peer_are_cancelled_and_their_chunks_freed(spawn: Callable[..., Node]) -> None:
    """A peer starts stream handlers that never read, fills their windows, and goes. The
    handlers used to run on forever (only their readers were failed), pinning the chunks."""
    node = spawn("gone-peer")
    streams, per_stream = 8, 4 * CHUNK_SIZE

    async def main() -> None:
        with trio.fail_after(30):
            async with legit(node) as b:
                await wait_node(b, node)
                h = await Hostile.connect(node.address)
                await h.handshake()
                for i in range(streams):
                    await h.send_packet(REQ, request(f"park-{i}", "t.park", stream=True))
                    for seq in range(per_stream // CHUNK_SIZE):
                        await h.send_stream_data(0, f"park-{i}", seq, b"p" * CHUNK_SIZE)
                with trio.fail_after(5):
                    while (s := await stats(b, node))["parked_buffered"] < streams * per_stream:
                        await trio.sleep(0.05)
                assert s["parked"] == streams, s
                await h.aclose()  # gone, not gracefully
                with trio.move_on_after(3):
                    while (s := await stats(b, node))["parked"] or s["parked_buffered"] or s["serving"]:
                        await trio.sleep(0.1)
                assert s["parked"] == 0 and s["serving"] == 0, f"3 s after the peer left: {s}"
                assert s["parked_buffered"] == 0, s
                await still_serving(b, node)

    trio.run(main)


def test_a_peer_that_never_reads_does_not_hold_a_producer_forever(spawn: Callable[..., Node]) -> None:
    """The peer sends heartbeats (so it is not lost) but reads nothing, so it never grants
    credit: the node's producer must fail with StreamIdleTimeoutError within the idle timeout
    (a stream created by a handler had no idle timeout: it waited for credit forever)."""
    idle = 1.0
    node = spawn("never-reads", opts={"stream_idle_timeout": idle})

    async def main() -> None:
        with trio.fail_after(30):
            async with legit(node) as b, trio.open_nursery() as nursery:
                await wait_node(b, node)
                h = await Hostile.connect(node.address)
                await h.handshake()

                async def heartbeats() -> None:
                    while True:
                        await h.send_packet(HEARTBEAT_FRAME, {"cpu": 1})
                        await trio.sleep(0.2)

                nursery.start_soon(heartbeats)
                await h.send_packet(REQ, request("push-1", "t.push", {"tag": "x", "size": 64 * MiB}))
                outcomes: dict[str, str] = {}
                give_up = trio.current_time() + idle + 3
                while trio.current_time() < give_up:
                    outcomes = await b.call("t.outcomes", node_id=node.node_id, timeout=2)
                    if outcomes.get("x") not in (None, "running"):
                        break
                    await trio.sleep(0.1)
                assert outcomes.get("x") == "StreamIdleTimeoutError", \
                    f"the producer's state {idle + 3:g}s after the peer stopped reading: {outcomes}"
                assert "intruder" in (await stats(b, node))["connected"]  # the heartbeats kept it
                nursery.cancel_scope.cancel()
                await still_serving(b, node)

    trio.run(main)


def test_incomplete_huge_hellos_do_not_pin_memory(spawn: Callable[..., Node]) -> None:
    """40 unauthenticated connections each send most of an 8 MiB HELLO: the node buffered
    every one (320 MiB) until the handshake timeout. It may hold at most about
    max_handshakes x max_hello_size (64 x 64 KiB = 4 MiB) for handshakes."""
    node = spawn("big-hello", secret="s3cret")
    total = 8 * MiB
    header = bytearray(encode_frame(HELLO, b""))
    header[1:5] = total.to_bytes(4, "big")
    header[0] = header[1] ^ header[2] ^ header[3] ^ header[4] ^ header[5]
    body = b"\x00" * (total - 6 - 4096)

    async def main() -> None:
        with trio.fail_after(30):
            async with legit(node, secret="s3cret") as b:
                await wait_node(b, node)
                base = node.rss()
                conns: list[Hostile] = []

                async def flood() -> None:
                    h = await Hostile.connect(node.address)
                    conns.append(h)
                    with trio.move_on_after(3):
                        try:
                            await h.send_raw(bytes(header) + body)
                        except (Closed, OSError):
                            pass

                async with trio.open_nursery() as nursery:
                    for _ in range(40):
                        nursery.start_soon(flood)
                peak = node.rss()
                with trio.move_on_after(1.5):  # the node may still be reading what was sent
                    while True:
                        peak = max(peak, node.rss())
                        await trio.sleep(0.05)
                growth = peak - base
                print(f"RSS growth for 40 incomplete 8 MiB HELLOs: {growth / MiB:.1f} MiB")
                assert growth < 40 * MiB, f"RSS grew by {growth / MiB:.0f} MiB for 40 incomplete HELLOs"
                await still_serving(b, node)
                for h in conns:
                    await h.aclose()

    trio.run(main)


def test_connections_beyond_max_handshakes_are_closed_at_once(spawn: Callable[..., Node]) -> None:
    """New API: max_handshakes. Connections that say nothing hold a handshake slot (for the
    handshake timeout); beyond the limit new connections are closed at once."""
    node = spawn("handshakes", opts={"max_handshakes": 16})  # a quarter (4) per host

    async def main() -> None:
        with trio.fail_after(30):
            conns = [await Hostile.connect(node.address) for _ in range(12)]
            await trio.sleep(0.2)
            closed = [False] * len(conns)

            async def watch(i: int) -> None:
                closed[i] = await conns[i].closed_by_peer(1.0)

            async with trio.open_nursery() as nursery:
                for i in range(len(conns)):
                    nursery.start_soon(watch, i)
            assert closed.count(True) >= 7 and closed.count(False) >= 3, closed
            for h in conns:
                await h.aclose()
            async with legit(node) as b:
                await wait_node(b, node)
                await still_serving(b, node)

    trio.run(main)


def test_dead_addresses_from_peers_are_forgotten_after_max_redials(spawn: Callable[..., Node]) -> None:
    """New API: max_redials. A PEERS frame naming a dead node started a dial loop that never
    gave up (backoff capped at 5 s, forever). The dead node here accepts and closes at once,
    so every attempt is counted."""
    node = spawn("redials", opts={"max_redials": 1})

    async def main() -> None:
        attempts: list[float] = []
        with trio.fail_after(30):
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            dead = f"tcp://127.0.0.1:{listeners[0].socket.getsockname()[1]}"

            async def dead_node() -> None:
                while True:
                    conn = await listeners[0].accept()
                    attempts.append(trio.current_time())
                    await trio.aclose_forcefully(conn)

            async with legit(node) as b, trio.open_nursery() as nursery:
                nursery.start_soon(dead_node)
                await wait_node(b, node)
                h = await Hostile.connect(node.address)
                await h.handshake()
                start = trio.current_time()
                await h.send(PEERS, pack({"nodes": {"ghost": dead}}))
                with trio.move_on_after(6):
                    while len(attempts) <= 4:
                        await trio.sleep(0.05)
                late = [t - start for t in attempts if t - start > 4]
                assert len(attempts) <= 3 and not late, \
                    f"{len(attempts)} dials of a dead address in 6 s (max_redials=1), at {[round(t - start, 2) for t in attempts]}"
                nursery.cancel_scope.cancel()
                await still_serving(b, node)
            for listener in listeners:
                await listener.aclose()

    trio.run(main)


# --- 6. nothing before authentication ---------------------------------------------------


def test_no_frame_is_processed_before_the_peer_proves_the_secret(spawn: Callable[..., Node]) -> None:
    """With secret=: REQ / EVENT / INFO / PEERS / STREAM frames sent instead of the HELLO, with
    it, instead of the proof or after a wrong proof reach no handler, no registry and no dial
    loop. The same frames after a good proof do (so the checks can see them)."""
    node = spawn("auth", secret="s3cret")

    async def main() -> None:
        attempts: list[str] = []
        with trio.fail_after(45):
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            ghost = f"tcp://127.0.0.1:{listeners[0].socket.getsockname()[1]}"

            async def ghost_node() -> None:
                while True:
                    conn = await listeners[0].accept()
                    attempts.append("dialed")
                    await trio.aclose_forcefully(conn)

            def junk(sender: str) -> bytes:
                def packet(kind: int, fields: dict[str, Any]) -> bytes:
                    return encode_frame(kind, pack({"ver": "5", "sender": sender, **fields}))

                from nerve.frames import FrameEncoder

                enc = FrameEncoder(1 << 24)
                enc.append_stream_data(0, f"{sender}-up", 0, b"s" * 100)
                enc.append_stream_data(STREAM_FLAG_END, f"{sender}-up", 1, b"")
                return b"".join([
                    packet(INFO, {"services": [{"name": "evil", "actions": {"evil.a": {"name": "evil.a"}},
                                                "events": {}}], "instanceID": sender, "seq": 1}),
                    packet(REQ, request(f"{sender}-touch", "t.touch")),
                    packet(EVENT, {"event": "evil.x", "data": {}, "groups": ["t"]}),
                    encode_frame(PEERS, pack({"nodes": {f"{sender}-ghost": ghost}})),
                    packet(REQ, request(f"{sender}-up", "t.touch", stream=True)),
                    enc.take(),
                ])

            async with legit(node, secret="s3cret") as b, trio.open_nursery() as nursery:
                nursery.start_soon(ghost_node)
                await wait_node(b, node)

                # instead of the HELLO
                h = await Hostile.connect(node.address, "pre-hello")
                await h.try_send_raw(junk("pre-hello"))
                assert await h.closed_by_peer(6)
                # in the HELLO's write, then a good proof
                h = await Hostile.connect(node.address, "with-hello")
                nonce = os.urandom(16)
                try:
                    await h.send_raw(encode_frame(HELLO, pack(hello_fields("with-hello", auth=True, nonce=nonce)))
                                     + junk("with-hello"))
                    from hostile import proof

                    ack = msgspec.msgpack.decode((await h.next_frame((HELLO_ACK,)))[1])
                    await h.send(HELLO, pack(hello_fields("with-hello", auth=True, proof=proof(
                        b"s3cret", b"dialer", ack["nonce"], nonce, "with-hello", ack["nodeID"]))))
                    await h.send_packet(PING, {"time": 1, "id": "p"})
                    with trio.fail_after(3):
                        await h.next_frame((PONG,))
                except Closed:
                    pass  # refusing the connection is fine too
                await h.aclose()
                # after the HELLO_ACK, instead of the proof
                h = await Hostile.connect(node.address, "no-proof")
                await h.send(HELLO, pack(hello_fields("no-proof", auth=True, nonce=os.urandom(16))))
                await h.next_frame((HELLO_ACK,))
                await h.try_send_raw(junk("no-proof"))
                assert await h.closed_by_peer(6)
                # a wrong proof, frames right behind it
                h = await Hostile.connect(node.address, "bad-proof")
                await h.send(HELLO, pack(hello_fields("bad-proof", auth=True, nonce=os.urandom(16))))
                await h.next_frame((HELLO_ACK,))
                await h.try_send_raw(encode_frame(HELLO, pack(hello_fields("bad-proof", auth=True,
                                                                           proof=os.urandom(32)))) + junk("bad-proof"))
                assert await h.closed_by_peer(6)

                await trio.sleep(0.5)
                s = await stats(b, node)
                assert s["touched"] == 0 and s["events"] == 0, s
                assert not [n for n in s["registry"] if n not in ("auth", "legit")], s
                assert not attempts, "the node dialed an address from an unauthenticated PEERS"

                # the same frames after a good proof are processed: the checks above can fail
                h = await Hostile.connect(node.address, "authed")
                await h.handshake(secret="s3cret")
                await h.send_raw(junk("authed"))
                with trio.fail_after(5):
                    while True:
                        s = await stats(b, node)
                        if s["touched"] >= 1 and s["events"] >= 1 and "authed" in s["registry"] and attempts:
                            break
                        await trio.sleep(0.1)
                await h.aclose()
                nursery.cancel_scope.cancel()
                await still_serving(b, node)
            for listener in listeners:
                await listener.aclose()

    trio.run(main)


def test_a_node_with_a_secret_processes_nothing_from_an_acceptor_that_fails_the_proof(
        spawn: Callable[..., Node]) -> None:
    """The dialing side: a node with a secret dials a hostile acceptor whose HELLO_ACK carries
    a wrong proof with INFO / REQ / PEERS frames right behind it. None is processed."""

    async def main() -> None:
        with trio.fail_after(30):
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            node = spawn("auth-dialer", peers=(f"tcp://127.0.0.1:{port}",), secret="s3cret")
            accepted = 0
            with trio.move_on_after(3):  # it may redial: answer every attempt the same way
                while True:
                    server = Hostile(await listeners[0].accept(), node_id="evil")
                    accepted += 1
                    try:
                        await server.next_frame((HELLO,))
                    except Closed:
                        continue
                    junk = b"".join(encode_frame(kind, pack({"ver": "5", "sender": "evil", **fields})) for kind, fields in [
                        (INFO, {"services": [{"name": "evil", "actions": {"evil.a": {"name": "evil.a"}}, "events": {}}],
                                "instanceID": "evil-1", "seq": 1}),
                        (REQ, request("evil-touch", "t.touch")),
                        (EVENT, {"event": "evil.x", "data": {}, "groups": ["t"]}),
                    ])
                    if await server.try_send_raw(encode_frame(HELLO_ACK, pack(hello_fields(
                            "evil", auth=True, nonce=os.urandom(16), proof=os.urandom(32)))) + junk):
                        assert await server.closed_by_peer(3), "the dialer kept a connection whose proof is wrong"
                    await server.aclose()
            assert accepted >= 1
            async with legit(node, secret="s3cret") as b:
                await wait_node(b, node)
                s = await stats(b, node)
                assert s["touched"] == 0 and s["events"] == 0 and "evil" not in s["registry"], s
                await still_serving(b, node)
            for listener in listeners:
                await listener.aclose()

    trio.run(main)


# --- large chunks received straight into their buffers (issue 15) ------------------------


def _big_frame_start(stream_id: str, body: int, sent: int) -> bytes:
    """The first bytes of a STREAM_DATA frame announcing a ``body``-byte chunk: its header,
    stream header and ``sent`` bytes of the chunk (the rest never comes)."""
    enc = FrameEncoder(1 << 30)
    enc.append_stream_data(0, stream_id, 0, b"\x00" * body)
    return enc.take()[: 6 + 2 + len(stream_id) + 8 + sent]


def test_a_large_chunk_cut_off_midway_holds_only_that_connection(spawn: Callable[..., Node]) -> None:
    """A peer announces chunks of nearly max_frame_size and stops part-way through each (the
    node reads such a chunk straight into a buffer of its full size, waiting for the rest
    with SO_RCVLOWAT): the node serves others meanwhile, and the buffers of peers that left
    mid-chunk are freed, however many come and go."""
    node = spawn("cut-chunks")
    body = 8 * MiB - 1024  # under the default max_frame_size (8 MiB)

    async def main() -> None:
        with trio.fail_after(50):
            async with legit(node) as b:
                await wait_node(b, node)
                base = node.rss()
                for round_ in range(24):
                    h = await Hostile.connect(node.address, node_id=f"intruder-{round_}")
                    await h.handshake()
                    await h.send_packet(REQ, request(f"up-{round_}", "t.upload", stream=True))
                    await h.send_raw(_big_frame_start(f"up-{round_}", body, 4 * MiB))
                    if round_ % 8 == 0:
                        await still_serving(b, node, calls=2)  # while it sits mid-chunk
                    await h.aclose()
                await still_serving(b, node)
                # 24 x 4 MiB received of 8 MiB chunks: freed as each peer left (the allocator may keep some)
                assert node.rss() - base < 64 * MiB, (base, node.rss())

    trio.run(main)


def test_a_large_chunk_with_a_bad_stream_id_ends_only_that_connection(spawn: Callable[..., Node]) -> None:
    node = spawn("bad-big-id")

    async def main() -> None:
        with trio.fail_after(30):
            async with legit(node) as b:
                await wait_node(b, node)
                h = await Hostile.connect(node.address)
                await h.handshake()
                frame = _big_frame_start("abcd", 4 * MiB, 50_000)
                stream_header_at = 6 + 2
                bad = frame[:stream_header_at] + b"\xff\xfe\xc3\x28" + frame[stream_header_at + 4:]
                await h.send_raw(bad)
                assert await h.closed_by_peer(5), "the node kept a connection after a non-UTF-8 stream id"
                await still_serving(b, node)

    trio.run(main)


def test_a_large_chunk_on_a_slow_steady_link_is_not_taken_for_silence(spawn: Callable[..., Node]) -> None:
    """A 1 MiB chunk trickles in at 256 KiB/s, slower than the heartbeat timeout (2 s) allows
    for the whole chunk. While the reader waits for the rest of a chunk (SO_RCVLOWAT) it must
    still read what comes, so the peer is seen alive: the upload completes, and the node
    never marks the peer lost. (Found by review: waiting on the mark alone dropped it.)"""
    node = spawn("slow-link", opts={"heartbeat_timeout": 2.0, "heartbeat_interval": 0.5})
    data, digest = payload(3, MiB)

    async def main() -> None:
        with trio.fail_after(40):
            h = await Hostile.connect(node.address, node_id="slowlink")
            await h.handshake()
            await h.send_packet(REQ, request("up-slow", "t.upload", stream=True))
            enc = FrameEncoder(1 << 30)
            enc.append_stream_data(0, "up-slow", 0, data)
            enc.append_stream_data(STREAM_FLAG_END, "up-slow", 1, b"")
            wire = enc.take()
            step = 32 * 1024
            for at in range(0, len(wire), step):  # 32 KiB every 0.125 s: 256 KiB/s
                assert await h.try_send_raw(wire[at:at + step]), "the node closed a live connection"
                await trio.sleep(0.125)
            res = await h.next_frame((RES,))
            assert res is not None
            assert digest.encode() in res[1], res  # t.upload answers the chunk's digest
            assert "silent" not in node.stderr()
            await h.aclose()

    trio.run(main)
