"""Cancellation crosses the wire on the native transports: a caller that stops waiting (its
scope cancelled, its timeout fired) gets the callee's handler cancelled (a CANCEL frame,
docs/protocol.md), in another process over TCP and in memory. Garbage CANCEL frames end at
most that peer's connection."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
import trio

import nerve
from nerve.frames import FrameType, encode_frame
from test_tcp_cluster import Cluster

pytestmark = pytest.mark.anyio


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.stop()


async def _stats(client: nerve.Broker) -> dict[str, int]:
    return await client.call("work.hold_stats", node_id="w1", timeout=5)  # type: ignore[no-any-return]


async def _until(client: nerve.Broker, pred: object, timeout: float = 5.0) -> dict[str, int]:
    with trio.fail_after(timeout):
        while True:
            stats = await _stats(client)
            if pred(stats):  # type: ignore[operator]
                return stats
            await trio.sleep(0.02)


def test_a_cancelled_caller_cancels_the_handler_in_another_process(cluster: Cluster) -> None:
    seed = cluster.start("w1")

    async def main() -> None:
        async with nerve.Broker("caller", transport="tcp://127.0.0.1:0", peers=[seed]) as client:
            await client.wait_for_services("work")
            async with trio.open_nursery() as nursery:
                scopes = []
                for _ in range(5):
                    scope = trio.CancelScope()
                    scopes.append(scope)

                    async def one(scope: trio.CancelScope = scope) -> None:
                        with scope:
                            await client.call("work.hold", {"seconds": 30}, node_id="w1")

                    nursery.start_soon(one)
                await _until(client, lambda s: s["holding"] == 5)
                for scope in scopes[:3]:
                    scope.cancel()
                stats = await _until(client, lambda s: s["cancelled"] == 3)
                assert stats["holding"] == 2 and stats["finished"] == 0
                nursery.cancel_scope.cancel()
            stats = await _until(client, lambda s: s["cancelled"] == 5)
            assert stats == {"holding": 0, "cancelled": 5, "finished": 0}

    trio.run(main)


def test_a_caller_timeout_cancels_the_handler_in_another_process(cluster: Cluster) -> None:
    seed = cluster.start("w1")

    async def main() -> None:
        async with nerve.Broker("caller", transport="tcp://127.0.0.1:0", peers=[seed]) as client:
            await client.wait_for_services("work")
            with pytest.raises(nerve.errors.RequestTimeoutError):
                # the handler itself sleeps longer than the call's timeout; the budget it got is
                # cut by our CANCEL before (or as) its own deadline would fire
                await client.call("work.hold", {"seconds": 30}, node_id="w1", timeout=0.3)
            stats = await _until(client, lambda s: s["cancelled"] == 1)
            assert stats["holding"] == 0 and stats["finished"] == 0
            # a call that is answered sends no CANCEL: the next one finishes normally
            assert await client.call("work.hold", {"seconds": 0.01}, node_id="w1", timeout=5) == "finished"
            stats = await _stats(client)
            assert stats == {"holding": 0, "cancelled": 1, "finished": 1}

    trio.run(main)


@pytest.mark.parametrize("remote_mw", [False, True], ids=["flat", "remote_action-middleware"])
async def test_cancellation_in_memory_reaches_the_handler(remote_mw: bool) -> None:
    state = {"cancelled": 0, "started": 0}
    started = trio.Event()

    class Slow(nerve.Service):
        name = "slow"

        @nerve.action
        async def run(self, ctx: nerve.Context) -> None:
            state["started"] += 1
            started.set()
            try:
                await trio.sleep(100)
            except trio.Cancelled:
                state["cancelled"] += 1
                raise

    class Passing(nerve.Middleware):
        def remote_action(self, next, action):  # type: ignore[no-untyped-def]
            async def handler(ctx):  # type: ignore[no-untyped-def]
                return await next(ctx)
            return handler

    mws = [Passing()] if remote_mw else []
    async with nerve.Broker("srv", services=[Slow()]) as srv, nerve.Broker("cli", middlewares=mws) as cli:
        await cli.wait_for_services("slow")
        with trio.move_on_after(5) as guard:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: cli.call("slow.run", node_id="srv"))
                await started.wait()
                nursery.cancel_scope.cancel()
        assert not guard.cancelled_caught
        with trio.fail_after(2):
            while state["cancelled"] < 1:
                await trio.sleep(0.01)
        assert srv.transit.cancelled == 1


def _frame(kind: int, payload: bytes) -> bytes:
    return bytes(encode_frame(kind, payload))


@pytest.mark.parametrize(("payload", "dropped"),
                         [(b"\xff\xfe not utf-8", True), (b"x" * 5000, True), (b"", False), (b"no-such-call", False)],
                         ids=["bad-utf8", "huge", "empty", "unknown-id"])
async def test_garbage_cancel_frames_end_at_most_that_connection(payload: bytes, dropped: bool) -> None:
    class Echo(nerve.Service):
        name = "echo"

        @nerve.action
        async def it(self, ctx: nerve.Context) -> object:
            return ctx.params

    async with nerve.Broker("target", transport="tcp://127.0.0.1:0", services=[Echo()]) as target:
        async with nerve.Broker("friend", transport="tcp://127.0.0.1:0", peers=[target.address]) as friend:
            await friend.wait_for_services("echo")
            host, port = target.address.removeprefix("tcp://").rsplit(":", 1)
            import msgspec

            hello = msgspec.msgpack.encode({"nodeID": "attacker", "namespace": "", "ver": "5", "cancel": True,
                                            "window": 1 << 20, "maxChunk": 1 << 16})
            s = await trio.open_tcp_stream(host, int(port))
            await s.send_all(_frame(int(FrameType.HELLO), hello))
            with trio.move_on_after(1):
                await s.receive_some(65536)  # HELLO_ACK
            with trio.fail_after(2):
                while "attacker" not in target.transport.connections:
                    await trio.sleep(0.01)
            await s.send_all(_frame(int(FrameType.CANCEL), payload))
            with trio.move_on_after(0.5):
                try:
                    while await s.receive_some(65536):
                        pass
                except trio.BrokenResourceError:
                    pass
            assert ("attacker" not in target.transport.connections) is dropped
            await s.aclose()
            # the node and its other peer carry on
            assert await friend.call("echo.it", {"x": 1}, timeout=5) == {"x": 1}


# --- raw peers: the callee's side of CANCEL ---------------------------------------------------

from nerve.packets import Request, Response  # noqa: E402
from nerve.serializers import get_serializer  # noqa: E402

_MSGPACK = get_serializer("msgpack")


class Held(nerve.Service):
    """Handlers that record how they ended."""

    name = "held"

    def __init__(self) -> None:
        self.ended: list[str] = []

    @nerve.action
    async def wait(self, ctx: nerve.Context) -> str:
        try:
            await trio.sleep(30)
        except trio.Cancelled:
            self.ended.append("cancelled")
            raise
        self.ended.append("finished")
        return "finished"

    @nerve.action
    async def upload(self, ctx: nerve.Context) -> int:
        try:
            assert ctx.stream is not None
            return sum([len(c) async for c in ctx.stream])
        except BaseException as exc:
            self.ended.append(type(exc).__name__)
            raise

    @nerve.action
    async def download(self, ctx: nerve.Context) -> nerve.PacketStream:
        async def gen() -> object:
            yield b"x" * 10

        return nerve.PacketStream.from_iterable(gen())


class RawPeer:
    """A hand-driven peer on one TCP connection (HELLO with cancel=true)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = __import__("nerve.frames", fromlist=["FrameDecoder"]).FrameDecoder(1 << 24)

    @classmethod
    async def connect(cls, target: nerve.Broker, node_id: str = "raw") -> RawPeer:
        import msgspec

        host, port = target.address.removeprefix("tcp://").rsplit(":", 1)  # type: ignore[union-attr]
        s = await trio.open_tcp_stream(host, int(port))
        hello = msgspec.msgpack.encode({"nodeID": node_id, "namespace": "", "ver": "5", "cancel": True,
                                        "window": 1 << 20, "maxChunk": 1 << 16})
        await s.send_all(_frame(int(FrameType.HELLO), hello))
        peer = cls(s)
        with trio.fail_after(2):
            while not any(f[0] == int(FrameType.HELLO_ACK) for f in await peer.frames()):
                pass
        with trio.fail_after(2):
            while node_id not in target.transport.connections:  # type: ignore[attr-defined]
                await trio.sleep(0.01)
        return peer

    async def frames(self) -> list[tuple]:  # type: ignore[type-arg]
        data = await self.stream.receive_some(1 << 16)
        if not data:
            raise EOFError
        return list(self.decoder.feed(data))

    async def send(self, *frames: bytes) -> None:
        await self.stream.send_all(b"".join(frames))


def _req(call_id: str, action: str, **kw: object) -> bytes:
    return _frame(int(FrameType.REQUEST), _MSGPACK.encode(Request(ver="5", sender="raw", id=call_id,
                                                                  action=action, **kw)))  # type: ignore[arg-type]


def _cancel(call_id: str) -> bytes:
    return _frame(int(FrameType.CANCEL), call_id.encode())


async def test_a_request_id_reused_while_in_service_ends_that_connection_only() -> None:
    held = Held()
    async with nerve.Broker("target", transport="tcp://127.0.0.1:0", services=[held]) as target:
        peer = await RawPeer.connect(target)
        await peer.send(_req("dup", "held.wait", params={}), _req("dup", "held.download", params={}))
        with trio.fail_after(3):
            while "raw" in target.transport.connections:
                await trio.sleep(0.01)
        with trio.fail_after(3):  # its handler is cancelled with it: nobody will read its answer
            while target.transit.peer_requests.get("raw"):
                await trio.sleep(0.01)
        assert held.ended == ["cancelled"]
        assert not [k for k in target.transit.in_service if k[0] == "raw"]
        friend = await RawPeer.connect(target, "friend")
        await friend.send(_req("ok-1", "held.download", params={}))
        with trio.fail_after(3):
            got: list[tuple] = []  # type: ignore[type-arg]
            while not any(f[0] == int(FrameType.RESPONSE) for f in got):
                got += await friend.frames()


async def test_a_stream_request_cancelled_before_its_handler_starts_is_cancelled_and_answered() -> None:
    held = Held()
    async with nerve.Broker("target", transport="tcp://127.0.0.1:0", services=[held]) as target:
        peer = await RawPeer.connect(target)
        # REQ (with a request stream) and its CANCEL in one write: the handler is still queued
        await peer.send(_req("s-1", "held.upload", params={}, stream=True, seq=0), _cancel("s-1"))
        answer = None
        with trio.fail_after(3):
            while answer is None:
                for f in await peer.frames():
                    if f[0] == int(FrameType.RESPONSE):
                        answer = _MSGPACK.decode(int(FrameType.RESPONSE), f[1])
        assert isinstance(answer, Response) and answer.id == "s-1" and answer.success is False
        assert answer.error["name"] == "StreamError"
        assert held.ended == ["Cancelled"]  # the handler was cancelled as it started
        assert target.transit.cancelled == 1
        with trio.fail_after(2):
            while target.transit.peer_requests.get("raw") or target.transit.peer_streams.get("raw"):
                await trio.sleep(0.01)


async def test_a_response_stream_for_an_id_too_long_to_name_it_is_refused_with_an_error() -> None:
    async with nerve.Broker("target", transport="tcp://127.0.0.1:0", services=[Held()]) as target:
        peer = await RawPeer.connect(target)
        long_id = "L" * 300
        await peer.send(_req(long_id, "held.download", params={}))
        answer = None
        with trio.fail_after(3):
            while answer is None:
                for f in await peer.frames():
                    if f[0] == int(FrameType.RESPONSE):
                        answer = _MSGPACK.decode(int(FrameType.RESPONSE), f[1])
        assert isinstance(answer, Response) and answer.success is False and not answer.stream
        assert "longer than 255 bytes" in answer.error["message"]
        with trio.fail_after(2):
            while target.transit.peer_requests.get("raw"):
                await trio.sleep(0.01)


async def test_a_gone_peers_queued_handlers_plain_and_stream_are_cancelled_as_they_start() -> None:
    """The peer is lost before any worker picked its requests up (no checkpoint between)."""
    ended: list[str] = []

    class Slow(nerve.Service):
        name = "slowq"

        @nerve.action
        async def run(self, ctx: nerve.Context) -> int:
            try:
                await trio.sleep(1.0)  # does not read its request stream
            except trio.Cancelled:
                ended.append(f"cancelled {ctx.id}")
                raise
            ended.append(f"finished {ctx.id}")
            return 1

    async with nerve.Broker("gone-q", services=[Slow()]) as s:
        t = s.transit

        def req(call_id: str, stream: bool) -> bytes:
            return t.serializer.encode(Request(ver=t.ver, sender="ghost", id=call_id, action="slowq.run",
                                               params={}, meta={}, timeout=0, level=1, stream=stream))

        t.on_frame("ghost", int(FrameType.REQUEST), req("plain-1", False))
        t.on_frame("ghost", int(FrameType.REQUEST), req("stream-1", True))
        t.on_disconnected("ghost", graceful=False)
        with trio.fail_after(0.5):
            while len(ended) < 2:
                await trio.sleep(0.01)
        assert sorted(ended) == ["cancelled plain-1", "cancelled stream-1"]
        assert not t.in_service and not t.peer_requests


@pytest.mark.parametrize("flag", ["yes", 1, None, [True], {"x": 1}, b"\xff\xfe", "\udcff"],
                         ids=["str", "int", "nil", "list", "map", "bad-utf8-bytes", "lone-surrogate"])
async def test_a_hello_with_a_garbage_cancel_flag_is_refused_and_the_node_carries_on(flag: object) -> None:
    import msgspec

    async with nerve.Broker("target", transport="tcp://127.0.0.1:0", services=[Held()]) as target:
        async with nerve.Broker("friend", transport="tcp://127.0.0.1:0", peers=[target.address]) as friend:
            await friend.wait_for_services("held")
            host, port = target.address.removeprefix("tcp://").rsplit(":", 1)  # type: ignore[union-attr]
            fields = {"nodeID": "attacker", "namespace": "", "ver": "5", "window": 1 << 20,
                      "maxChunk": 1 << 16, "cancel": flag}
            try:
                hello = msgspec.msgpack.encode(fields)
            except (TypeError, UnicodeEncodeError):
                hello = msgspec.msgpack.encode({**fields, "cancel": "x"})[:-1] + b"\xa1\xff"  # invalid UTF-8
            s = await trio.open_tcp_stream(host, int(port))
            await s.send_all(_frame(int(FrameType.HELLO), hello))
            with trio.move_on_after(2):
                try:
                    while await s.receive_some(65536):
                        pass
                except trio.BrokenResourceError:
                    pass
            await s.aclose()
            assert "attacker" not in target.transport.connections  # type: ignore[attr-defined]
            assert await friend.call("held.download") is not None  # the node and its peer carry on
