"""Protocol v4/v5 switch and namespaces: each cluster talks only to its own kind."""

from __future__ import annotations

import msgspec
import pytest
import trio

import nerve
from nerve.packets import Request
from nerve.serializers import MsgPackSerializer

pytestmark = pytest.mark.anyio


class Echo(nerve.Service):
    name = "echo"

    @nerve.action
    async def echo(self, ctx: nerve.Context) -> dict[str, object]:
        ctx.meta["seen_by"] = ctx.broker.node_id
        return {"params": ctx.params, "headers": ctx.headers}


@pytest.mark.parametrize("transport", ["local", "tcp"])
async def test_v4_cluster_works_and_sends_no_headers(transport: str) -> None:
    tcp = transport == "tcp"
    kw = {"transport": "tcp://127.0.0.1:0"} if tcp else {}
    async with nerve.Broker("v4-a", protocol_version="4", services=[Echo()], **kw) as a:
        peer = {"peers": [a.address]} if tcp else {}
        async with nerve.Broker("v4-b", protocol_version="4", **kw, **peer) as b:
            await b.wait_for_services("echo")
            sent: list[bytes] = []
            original = b.transport.send

            def spy(node_id: str, kind: int, payload: bytes) -> None:
                sent.append(payload)
                original(node_id, kind, payload)

            b.transport.send = spy  # type: ignore[method-assign]
            meta: dict[str, object] = {}
            result = await b.call("echo.echo", {"x": 1}, meta=meta, headers={"h": 1})
            assert result == {"params": {"x": 1}, "headers": {}}  # v4 carries no headers
            assert meta == {"seen_by": "v4-a"}
            req = MsgPackSerializer().decode(2, sent[-1])
            assert isinstance(req, Request) and req.ver == "4" and req.headers is nerve.packets.UNSET


async def test_v5_and_v4_nodes_refuse_each_other_over_tcp() -> None:
    async with nerve.Broker("mix-5", transport="tcp://127.0.0.1:0", services=[Echo()]) as a:
        async with nerve.Broker("mix-4", transport="tcp://127.0.0.1:0", peers=[a.address],
                                protocol_version="4") as b:
            await trio.sleep(0.5)
            assert b.transport.connected() == [] and a.transport.connected() == []
            with pytest.raises(nerve.errors.ServiceNotFoundError):
                await b.call("echo.echo")


@pytest.mark.parametrize("transport", ["local", "tcp"])
async def test_namespaces_isolate_clusters(transport: str) -> None:
    tcp = transport == "tcp"
    kw = {"transport": "tcp://127.0.0.1:0"} if tcp else {}
    async with nerve.Broker("ns-a", namespace="blue", services=[Echo()], **kw) as a:
        peer = {"peers": [a.address]} if tcp else {}
        async with nerve.Broker("ns-b", namespace="green", **kw, **peer) as b, \
                nerve.Broker("ns-c", namespace="blue", **kw, **peer) as c:
            await c.wait_for_services("echo")
            assert (await c.call("echo.echo", 1))["params"] == 1
            await trio.sleep(0.3)
            assert "echo.echo" not in b.registry.actions
            with pytest.raises(nerve.errors.ServiceNotFoundError):
                await b.call("echo.echo")


async def test_a_dropped_connection_is_redialed_and_calls_resume() -> None:
    async with nerve.Broker("rd-a", transport="tcp://127.0.0.1:0", services=[Echo()]) as a:
        async with nerve.Broker("rd-b", transport="tcp://127.0.0.1:0", peers=[a.address]) as b:
            await b.wait_for_services("echo")
            first = b.transport.connections["rd-a"]
            # A network blip: the socket dies without a DISCONNECT.
            await first.stream.aclose()
            with trio.fail_after(10):
                while True:
                    conn = b.transport.connections.get("rd-a")
                    if conn is not None and conn is not first and "echo.echo" in b.registry.actions:
                        break
                    await trio.sleep(0.02)
            assert (await b.call("echo.echo", 7))["params"] == 7
            assert len(a.transport.connected()) == 1 and len(b.transport.connected()) == 1


@pytest.mark.parametrize("secrets", [("s3cret", "s3cret"), ("s3cret", "other"), ("s3cret", None), (None, "s3cret")])
async def test_shared_secret_authentication(secrets: tuple[str | None, str | None]) -> None:
    mine, theirs = secrets
    async with nerve.Broker("auth-a", transport="tcp://127.0.0.1:0", services=[Echo()], secret=mine) as a:
        async with nerve.Broker("auth-b", transport="tcp://127.0.0.1:0", peers=[a.address], secret=theirs) as b:
            if mine == theirs:
                await b.wait_for_services("echo")
                assert (await b.call("echo.echo", 1))["params"] == 1
            else:
                await trio.sleep(0.5)
                assert a.transport.connected() == [] and b.transport.connected() == []
                assert "echo.echo" not in b.registry.actions


async def test_a_wrong_proof_is_refused_before_any_frame_is_processed() -> None:
    import socket

    from nerve.frames import FrameDecoder, FrameType, encode_frame
    from nerve.transports.tcp import Hello, _hello_encoder

    async with nerve.Broker("auth-c", transport="tcp://127.0.0.1:0", services=[Echo()], secret="k") as a:
        host, port = a.address.removeprefix("tcp://").split(":")
        sock = socket.create_connection((host, int(port)))
        sock.settimeout(5)
        hello = Hello(node_id="intruder", window=1 << 20, max_chunk=1 << 16, auth=True, nonce=b"n" * 16)
        sock.sendall(encode_frame(FrameType.HELLO, _hello_encoder.encode(hello)))
        ack_bytes = await trio.to_thread.run_sync(sock.recv, 65536)
        ((_, ack_payload),) = FrameDecoder().feed(ack_bytes)
        ack = msgspec.msgpack.decode(ack_payload, type=Hello)
        assert ack.accept and ack.auth and len(ack.proof) == 32  # provisional: our proof is next
        forged = Hello(node_id="intruder", window=1 << 20, max_chunk=1 << 16, proof=b"x" * 32)
        sock.sendall(encode_frame(FrameType.HELLO, _hello_encoder.encode(forged))
                     + encode_frame(FrameType.DISCOVER, b"\x80"))
        try:
            rest = await trio.to_thread.run_sync(sock.recv, 65536)
        except ConnectionResetError:  # closed with our DISCOVER unread: never looked at
            rest = b""
        assert rest == b""  # closed, nothing answered
        sock.close()
        assert "intruder" not in a.registry.nodes


async def test_a_peer_that_never_reads_is_disconnected_not_buffered_without_bound(
        caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from nerve.frames import FrameType, encode_frame
    from nerve.packets import Request
    from nerve.serializers import MsgPackSerializer
    from nerve.transports.tcp import Hello, _hello_encoder

    async with nerve.Broker("wq-server", transport="tcp://127.0.0.1:0", services=[Echo()],
                            max_write_queue=8 * 1024 * 1024) as server:
        async with nerve.Broker("wq-good", transport="tcp://127.0.0.1:0", peers=[server.address]) as good:
            await good.wait_for_services("echo")
            host, port = server.address.removeprefix("tcp://").split(":")
            sock = socket.create_connection((host, int(port)))
            sock.setblocking(True)
            hello = Hello(node_id="greedy", window=1 << 20, max_chunk=1 << 16)
            sock.sendall(encode_frame(FrameType.HELLO, _hello_encoder.encode(hello)))
            serializer = MsgPackSerializer()
            payload = b"p" * 65536
            frames = b"".join(
                encode_frame(FrameType.REQUEST, serializer.encode(Request(
                    ver="5", sender="greedy", id=f"g{i}", action="echo.echo", params=payload,
                    meta={}, headers={}, timeout=0, level=1)))
                for i in range(64))

            def flood() -> None:
                try:
                    for _ in range(40):  # 160 MiB of requests; their answers are never read
                        sock.sendall(frames)
                except OSError:
                    pass

            with trio.fail_after(10):  # well before the 15 s heartbeat timeout
                await trio.to_thread.run_sync(flood)
                while "greedy" in server.transport.connected():
                    await trio.sleep(0.05)
            sock.close()
            assert "it is not reading" in caplog.text
            assert (await good.call("echo.echo", 5))["params"] == 5
            import resource

            assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 1024 * 1024  # < 1 GiB peak
