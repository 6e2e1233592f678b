"""Streams over NATS between nerve nodes (a real NATS server): nerve's credited stream frames
when both sides offer them in INFO, Moleculer's stream packets otherwise; bounded readers for
producers without flow control; balanced mode; hostile stream messages; the reconnect buffer."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import nerve
from nerve.errors import BrokerDisconnectedError, BrokerOptionsError, StreamError, StreamOverflowError
from nerve.packets import PacketType
from nerve.transports.nats import NatsTransport
from nerve.transports.nats_client import NatsClient

from nats_server import ensure_nats

pytestmark = pytest.mark.anyio

SIZE = 3 * 1024 * 1024 + 123


def blob(size: int, seed: int = 7) -> bytes:
    return bytes((i * 31 + seed) & 255 for i in range(256)) * (size // 256) + bytes(
        (i * 31 + seed) & 255 for i in range(size % 256))


DATA = blob(SIZE)


class MoleculerOnly(NatsTransport):
    """A NATS transport that never learns that a peer reads nerve's stream frames: every
    stream goes as Moleculer's packets, as it does to a moleculer.js node."""

    def set_peer_streams(self, node_id: str, config: tuple[int, int, int] | None) -> None:
        super().set_peer_streams(node_id, None)


async def pieces(data: bytes, size: int = 65536, pause: float = 0.0) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]
        if pause:
            await trio.sleep(pause)


class Files(nerve.Service):
    name = "files"

    def __init__(self, read_pause: float = 0.0) -> None:
        super().__init__()
        self.read_pause = read_pause
        self.errors: list[BaseException] = []

    @nerve.action
    async def upload(self, ctx: nerve.Context) -> dict[str, Any]:
        digest = hashlib.sha256()
        n = 0
        assert ctx.stream is not None
        try:
            async for chunk in ctx.stream:
                digest.update(chunk)
                n += len(chunk)
                if self.read_pause:
                    await trio.sleep(self.read_pause)
        except StreamError as exc:
            self.errors.append(exc)
            raise
        return {"bytes": n, "sha256": digest.hexdigest(), "meta": ctx.meta, "params": ctx.params}

    @nerve.action
    async def download(self, ctx: nerve.Context) -> nerve.PacketStream:
        ctx.meta["size"] = SIZE
        return nerve.PacketStream.from_iterable(pieces(DATA, 100_000))

    @nerve.action
    async def who(self, ctx: nerve.Context) -> str:
        return ctx.broker.node_id  # type: ignore[attr-defined, no-any-return]


def namespace() -> str:
    return f"ns{os.getpid()}x{trio.current_time() * 1e6 % 1e9:.0f}"


def transport(url: str, moleculer_only: bool) -> str | NatsTransport:
    return MoleculerOnly(url) if moleculer_only else url


@pytest.mark.parametrize("serializer", ["msgpack", "json"])
@pytest.mark.parametrize("moleculer_only", [False, True], ids=["nerve-frames", "moleculer-packets"])
async def test_upload_and_download_between_nerve_nodes(serializer: str, moleculer_only: bool) -> None:
    url = ensure_nats()
    ns = namespace()
    async with nerve.Broker("srv", transport=transport(url, moleculer_only), namespace=ns,
                            serializer=serializer, services=[Files()]) as srv, \
            nerve.Broker("cli", transport=transport(url, moleculer_only), namespace=ns,
                         serializer=serializer) as cli:
        with trio.fail_after(10):
            await cli.wait_for_services("files")
            while not moleculer_only and not cli.transport.streams_native("srv"):
                await trio.sleep(0.02)  # (its INFO may come after its services are seen)
        assert cli.transport.streams_native("srv") is (not moleculer_only)
        assert srv.transport.streams_native("cli") is (not moleculer_only)
        with trio.fail_after(30):
            out = await cli.call("files.upload", {"name": "x"}, meta={"user": "u"},
                                 stream=nerve.PacketStream.from_iterable(pieces(DATA)))
        assert out == {"bytes": SIZE, "sha256": hashlib.sha256(DATA).hexdigest(), "meta": {"user": "u"},
                       "params": {"name": "x"}}
        meta: dict[str, Any] = {}
        with trio.fail_after(30):
            stream = await cli.call("files.download", meta=meta)
            assert isinstance(stream, nerve.PacketStream)
            got = await stream.read_all()
        assert got == DATA and meta["size"] == SIZE


async def test_a_slow_consumer_holds_a_credited_producer_back_over_nats() -> None:
    """nerve to nerve, the reader four times slower: the producer waits for credit, so what
    is buffered on the reading side stays within the window (nothing like the whole upload)."""
    url = ensure_nats()
    ns = namespace()
    window = 512 * 1024
    peak = 0

    class Slow(nerve.Service):
        name = "slow"

        @nerve.action
        async def upload(self, ctx: nerve.Context) -> int:
            nonlocal peak
            n = 0
            assert ctx.stream is not None
            async for chunk in ctx.stream:
                n += len(chunk)
                peak = max(peak, ctx.stream.statistics().bytes_buffered)
                await trio.sleep(0.004)
            return n

    async with nerve.Broker("srv", transport=url, namespace=ns, services=[Slow()], stream_window=window,
                            max_chunk=64 * 1024) as srv, \
            nerve.Broker("cli", transport=url, namespace=ns) as cli:
        with trio.fail_after(10):
            await cli.wait_for_services("slow")
            while not cli.transport.streams_native("srv"):
                await trio.sleep(0.02)
        data = blob(4 * 1024 * 1024)
        with trio.fail_after(60):
            assert await cli.call("slow.upload", stream=nerve.PacketStream.from_iterable(pieces(data))) == len(data)
        assert 0 < peak <= window
        assert srv.statistics().transit.streams_reading == 0


async def test_a_producer_without_flow_control_fails_the_stream_rather_than_grow() -> None:
    """Moleculer's packets (no credit) into a reader that does not keep up: once more than
    max_stream_buffer is unread the stream fails with StreamOverflowError, never grows; the
    node serves on."""
    url = ensure_nats()
    ns = namespace()
    files = Files(read_pause=0.05)
    limit = 512 * 1024
    async with nerve.Broker("srv", transport=MoleculerOnly(url), namespace=ns, services=[files],
                            max_stream_buffer=limit) as srv, \
            nerve.Broker("cli", transport=MoleculerOnly(url), namespace=ns) as cli:
        with trio.fail_after(10):
            await cli.wait_for_services("files")
        with trio.fail_after(30), pytest.raises(StreamError):
            await cli.call("files.upload", stream=nerve.PacketStream.from_iterable(pieces(blob(8 * 1024 * 1024))))
        assert len(files.errors) == 1 and isinstance(files.errors[0], StreamOverflowError)
        assert "max_stream_buffer" in str(files.errors[0])
        assert srv.statistics().transit.streams_reading == 0
        files.read_pause = 0.0
        with trio.fail_after(30):
            out = await cli.call("files.upload", stream=nerve.PacketStream.from_iterable(pieces(DATA)))
        assert out["bytes"] == SIZE


async def test_protocol_v4_streams_carry_no_params_to_a_moleculer_node() -> None:
    url = ensure_nats()
    ns = namespace()
    async with nerve.Broker("srv", transport=MoleculerOnly(url), namespace=ns, protocol_version="4",
                            serializer="json", services=[Files()]), \
            nerve.Broker("cli", transport=MoleculerOnly(url), namespace=ns, protocol_version="4",
                         serializer="json") as cli:
        with trio.fail_after(10):
            await cli.wait_for_services("files")
        with pytest.raises(BrokerOptionsError, match="meta"):
            await cli.call("files.upload", {"name": "x"}, stream=nerve.PacketStream.from_iterable(pieces(b"abc")))
        with trio.fail_after(30):
            out = await cli.call("files.upload", meta={"name": "x"},
                                 stream=nerve.PacketStream.from_iterable(pieces(DATA)))
        assert out["bytes"] == SIZE and out["meta"] == {"name": "x"} and out["params"] is None


async def test_balanced_mode_spreads_calls_and_events_over_the_queue_groups() -> None:
    url = ensure_nats()
    ns = namespace()
    got: list[tuple[str, Any]] = []

    class Worker(nerve.Service):
        name = "worker"

        @nerve.action
        async def who(self, ctx: nerve.Context) -> str:
            return ctx.broker.node_id  # type: ignore[attr-defined, no-any-return]

        @nerve.event("job.done")
        async def done(self, ctx: nerve.Context) -> None:
            got.append((ctx.broker.node_id, ctx.params))  # type: ignore[attr-defined]

    async with nerve.Broker("w1", transport=url, namespace=ns, disable_balancer=True, services=[Worker()]), \
            nerve.Broker("w2", transport=url, namespace=ns, disable_balancer=True, services=[Worker()]), \
            nerve.Broker("boss", transport=url, namespace=ns, disable_balancer=True) as boss:
        with trio.fail_after(10):
            while {n.id for n in boss.registry.available_nodes()} < {"w1", "w2", "boss"}:
                await trio.sleep(0.05)
            await boss.wait_for_services("worker")
            await trio.sleep(0.3)  # both workers' queue subscriptions are in
        with trio.fail_after(10):
            answers = [await boss.call("worker.who") for _ in range(40)]
        assert set(answers) == {"w1", "w2"}
        with trio.fail_after(10):  # a call that names its node goes there, balanced or not
            assert {await boss.call("worker.who", node_id="w2") for _ in range(10)} == {"w2"}
        for i in range(20):
            await boss.emit("job.done", i)
        with trio.fail_after(10):
            while len(got) < 20:
                await trio.sleep(0.02)
        await trio.sleep(0.2)
        # each event once, to one member of the "worker" group, and both members got some
        assert sorted(p for _, p in got) == list(range(20))
        assert {n for n, _ in got} == {"w1", "w2"}


def test_balanced_mode_needs_a_bus() -> None:
    with pytest.raises(BrokerOptionsError, match="NATS"):
        nerve.Broker("x", disable_balancer=True)
    with pytest.raises(BrokerOptionsError, match="NATS"):
        nerve.Broker("x", transport="tcp://127.0.0.1:0", disable_balancer=True)


async def test_our_own_entry_in_node_list_says_who_we_are() -> None:
    url = ensure_nats()
    async with nerve.Broker("me", transport=url, namespace=namespace()) as b:
        nodes = await b.call("$node.list")
    me = next(n for n in nodes if n["id"] == "me")
    assert me["local"] and me["hostname"] and me["instanceID"]
    assert me["client"]["type"] == "python" and me["client"]["name"] == "nerve"
    assert isinstance(me["ipList"], list)


def test_publishes_while_disconnected_wait_in_a_bounded_buffer() -> None:
    t = NatsTransport("nats://127.0.0.1:4222", max_reconnect_buffer=1000)
    t.broadcast(int(PacketType.HEARTBEAT), b"x" * 600)
    with pytest.raises(BrokerDisconnectedError, match="max_reconnect_buffer"):
        t.broadcast(int(PacketType.HEARTBEAT), b"y" * 600)
    t.broadcast(int(PacketType.HEARTBEAT), b"z" * 400)  # what still fits is held
    assert t.statistics().bytes_sent == 1000


# --- hostile stream messages --------------------------------------------------------------


def _json(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


async def test_hostile_stream_packets_end_at_most_their_stream() -> None:
    """Garbage on NSTREAM, Moleculer stream packets with bad seqs, wrong types, unknown ids,
    huge and nested values, out-of-order beyond the reorder bound: the node drops them or
    fails that one stream, and serves a legitimate upload meanwhile."""
    url = ensure_nats()
    ns = namespace()
    files = Files()
    async with nerve.Broker("srv", transport=url, namespace=ns, serializer="json", services=[files],
                            stream_idle_timeout=2) as srv, \
            nerve.Broker("cli", transport=url, namespace=ns, serializer="json") as cli:
        with trio.fail_after(10):
            await cli.wait_for_services("files")
        raw = await NatsClient.connect(url, name="attacker")
        prefix = f"MOL-{ns}"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(raw.writer)
                stream_subject = f"{prefix}.NSTREAM.srv"
                for payload in [b"", b"\x05ab", b"\x03cli", b"\x03cli" + os.urandom(50), b"\x02\xff\xfe" + b"x" * 20,
                                b"\xffabc", b"\x03cli" + b"\x00" * 6, b"\x03cli" + bytes([7, 0, 0, 0, 6, 21])]:
                    raw.publish(stream_subject, payload)
                req = f"{prefix}.REQ.srv"
                base = {"ver": "5", "sender": "evil", "action": "files.upload", "meta": {}, "headers": {}}
                # a Moleculer stream opened, then every kind of bad packet for it
                raw.publish(req, _json(**base, id="s1", params=None, stream=True, seq=0))
                for bad in [{"seq": -1, "stream": True, "params": {"type": "Buffer", "data": [1]}},
                            {"seq": "1", "stream": True, "params": None},
                            {"seq": 2 ** 60, "stream": True, "params": {"type": "Buffer", "data": [1]}},
                            {"seq": 1, "stream": True, "params": "text, not bytes"},
                            {"seq": 1, "stream": True, "params": {"type": "Buffer", "data": [256, -1]}},
                            {"seq": 1, "stream": True, "params": {"a": [[[[[[[[]]]]]]]]}},
                            {"seq": 1, "stream": True, "params": {"type": "Buffer", "data": "\udcff"}}]:
                    raw.publish(req, _json(**base, id="s1", **bad))
                # chunks for ids nobody opened, an end and an error for nothing
                raw.publish(req, _json(**base, id="nope", seq=3, stream=True, params={"type": "Buffer", "data": [1]}))
                raw.publish(req, _json(**{**base, "headers": {"$streamError": {"name": "X" * 10_000, "message": 5}}},
                                       id="nope", seq=9, stream=False, params=None))
                raw.publish(req, _json(**{**base, "headers": {"$streamError": [[[[[[[[[[[[[[[]]]]]]]]]]]]]]]}},
                                       id="s1", seq=9, stream=False, params=None))
                raw.publish(f"{prefix}.RES.srv", _json(ver="5", sender="evil", id="r", success=True, data=None,
                                                       stream=True, seq=4))
                # out of order beyond the reorder bound (64 chunks)
                raw.publish(req, _json(**base, id="s2", params=None, stream=True, seq=0))
                for seq in range(200, 70, -1):
                    raw.publish(req, _json(**base, id="s2", seq=seq, stream=True,
                                           params={"type": "Buffer", "data": [seq & 255]}))
                raw.publish(f"{prefix}.REQ.srv", b"\xff\xfe not json")
                await raw.drained()
                with trio.fail_after(30):
                    out = await cli.call("files.upload", stream=nerve.PacketStream.from_iterable(pieces(DATA)))
                assert out["bytes"] == SIZE
                with trio.fail_after(10):
                    while srv.statistics().transit.streams_reading:
                        await trio.sleep(0.05)  # both hostile streams failed (or timed out idle)
                nursery.cancel_scope.cancel()
        finally:
            await raw.aclose()
        assert len(files.errors) == 2
        assert all(isinstance(e, StreamError) for e in files.errors)


# --- the reader of a stream without flow control (a property) -----------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=40), st.randoms(use_true_random=False),
       st.integers(min_value=1, max_value=12))
def test_an_uncredited_reader_reorders_within_its_bound_and_fails_beyond(
        chunks: list[bytes], rnd: Any, reorder: int) -> None:
    """Chunks in any order: the reader gives them back in order when no chunk came more than
    ``max_reorder`` places early and the bytes fit the buffer; otherwise the stream fails
    with StreamOverflowError. It never hangs and never holds more than its bound."""
    order = list(range(len(chunks)))
    rnd.shuffle(order)
    limit = 1024

    async def main() -> None:
        reader = nerve.PacketStream(window=limit, max_chunk=limit, max_reorder=reorder, idle_timeout=1)
        reader.uncredited = True
        reader.bind_reader(lambda consumed, stop: None)
        for seq in order:
            reader.deliver(seq, chunks[seq])
            assert reader.statistics().bytes_buffered <= limit
        reader.deliver_end(len(chunks))
        try:
            got = await reader.read_all()
        except StreamOverflowError as exc:
            assert "max_stream_buffer" in str(exc)
            return
        assert got == b"".join(chunks)

    trio.run(main)


async def test_stream_offers_in_info_are_checked() -> None:
    """A peer's INFO says whether it reads nerve's stream frames: values out of range, of the
    wrong type or missing make it a Moleculer peer (packets), never a crash."""
    url = ensure_nats()
    ns = namespace()
    async with nerve.Broker("srv", transport=url, namespace=ns, serializer="json") as srv:
        raw = await NatsClient.connect(url, name="attacker")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(raw.writer)

                async def offer(value: Any) -> bool:
                    raw.publish(f"MOL-{ns}.INFO.srv", _json(ver="5", sender="evil", services=[], nerve=value))
                    await raw.drained()
                    await trio.sleep(0.15)
                    return srv.transport.streams_native("evil")

                good = {"streams": {"window": 65536, "maxChunk": 65536, "maxStreams": 4}}
                assert await offer(good)
                for bad in [None, 5, "x", {}, {"streams": None}, {"streams": {"window": "1"}},
                            {"streams": {"window": 10, "maxChunk": 5, "maxStreams": 1}},
                            {"streams": {"window": 2 ** 40, "maxChunk": 65536, "maxStreams": 1}},
                            {"streams": {"window": 65536, "maxChunk": 65536, "maxStreams": 0}},
                            {"streams": {"window": 65536.0, "maxChunk": 65536, "maxStreams": 1}},
                            [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]:
                    assert not await offer(bad), bad
                    assert await offer(good)
                assert srv.transport.peer_stream_config("evil") == (65536, 65536)
                assert srv.transport.peer_max_streams("evil") == 4
                nursery.cancel_scope.cancel()
        finally:
            await raw.aclose()


async def test_senders_that_cannot_name_a_subject_are_dropped() -> None:
    """A sender id is written into our answers' subjects: one with a line break would inject
    protocol lines (UNSUB our own subscriptions), one over the control-line limit would get
    the connection closed. Both are dropped where they enter; the node serves on."""
    url = ensure_nats()
    ns = namespace()
    async with nerve.Broker("srv", transport=url, namespace=ns, serializer="json", services=[Files()]), \
            nerve.Broker("cli", transport=url, namespace=ns, serializer="json") as cli:
        with trio.fail_after(10):
            await cli.wait_for_services("files")
        raw = await NatsClient.connect(url, name="attacker")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(raw.writer)
                for sender in ["x 0\r\n\r\nUNSUB 1\r\nUNSUB 2\r\nUNSUB 3\r\nPUB junk", "y" * 5000, "*", "a.>", "tab\there"]:
                    for kind in ("HEARTBEAT", "DISCOVER", "INFO"):
                        raw.publish(f"MOL-{ns}.{kind}", _json(ver="5", sender=sender, services=[]))
                await raw.drained()
                await trio.sleep(0.3)
                with trio.fail_after(10):
                    assert await cli.call("files.who") == "srv"
                nursery.cancel_scope.cancel()
        finally:
            await raw.aclose()
        assert all(" " not in n and len(n) < 256 for n in cli.registry.nodes)


async def test_a_stream_request_id_in_service_is_not_taken_twice() -> None:
    """A stream REQ reusing the id of one still in service (its stream over, its handler not)
    is refused: two handlers would share one call's slot (and CANCEL)."""
    url = ensure_nats()
    ns = namespace()
    runs: list[int] = []

    class Hold(nerve.Service):
        name = "hold"

        @nerve.action
        async def upload(self, ctx: nerve.Context) -> int:
            assert ctx.stream is not None
            data = await ctx.stream.read_all()
            runs.append(len(data))
            await trio.sleep(0.5)
            return len(data)

    async with nerve.Broker("srv", transport=url, namespace=ns, serializer="json", services=[Hold()]) as srv:
        raw = await NatsClient.connect(url, name="attacker")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(raw.writer)
                base = {"ver": "5", "sender": "evil", "id": "X", "action": "hold.upload", "meta": {}, "headers": {}}
                for _ in range(2):
                    raw.publish(f"MOL-{ns}.REQ.srv", _json(**base, params=None, stream=True, seq=0))
                    raw.publish(f"MOL-{ns}.REQ.srv", _json(**base, params={"type": "Buffer", "data": [1, 2]},
                                                           stream=True, seq=1))
                    raw.publish(f"MOL-{ns}.REQ.srv", _json(**base, params=None, stream=False, seq=2))
                    await raw.drained()
                    await trio.sleep(0.2)
                with trio.fail_after(10):
                    while srv.statistics().transit.requests_in_service:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        finally:
            await raw.aclose()
        assert runs == [2]
        assert srv.statistics().requests_served == 1


async def test_balanced_wildcard_subscriptions_use_the_tail_wildcard() -> None:
    url = ensure_nats()
    ns = namespace()
    got: list[str] = []

    class Listener(nerve.Service):
        name = "listener"

        @nerve.event("user.**")
        async def users(self, ctx: nerve.Context) -> None:
            got.append(ctx.event or "")

    async with nerve.Broker("srv", transport=url, namespace=ns, disable_balancer=True, services=[Listener()]), \
            nerve.Broker("cli", transport=url, namespace=ns, disable_balancer=True) as cli:
        with trio.fail_after(10):
            await cli.wait_for_services("listener")
            await trio.sleep(0.3)
            await cli.emit("user.created.today", 1)
            while not got:
                await trio.sleep(0.02)
        assert got == ["user.created.today"]


def test_held_publishes_over_the_servers_max_payload_are_refused_at_once() -> None:
    t = NatsTransport("nats://127.0.0.1:4222")
    t.max_payload = 1000
    from nerve.errors import ProtocolError

    with pytest.raises(ProtocolError, match="max_payload"):
        t.broadcast(int(PacketType.HEARTBEAT), b"x" * 2000)
    t.broadcast(int(PacketType.HEARTBEAT), b"x" * 900)


def test_a_node_id_that_cannot_name_a_subject_is_refused() -> None:
    async def main() -> None:
        with pytest.raises(BrokerOptionsError, match="subject"):
            async with nerve.Broker("has space", transport=ensure_nats()):
                pass

    trio.run(main)
