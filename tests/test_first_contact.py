"""What a new user meets (issue 14): a seed that is not listening is reported at once and
named when services do not come; a node listening on a wildcard address never advertises it;
``advertise=`` sets what peers dial. Real brokers on loopback TCP."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio

import nerve
from nerve.errors import BrokerOptionsError, RequestTimeoutError

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Hello(nerve.Service):
    name = "hello"

    @nerve.action
    async def hi(self, ctx: nerve.Context) -> str:
        return "hi"


async def test_an_unreachable_seed_is_a_warning_at_once_and_named_on_timeout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="nerve.tcp")
    port = free_port()  # nothing listens there
    seed = f"tcp://127.0.0.1:{port}"
    async with nerve.Broker("fc-lonely", transport="tcp://127.0.0.1:0", peers=[seed]) as b:
        with trio.fail_after(5):
            while not b.transport.unreachable_seeds():
                await trio.sleep(0.01)
        assert b.transport.unreachable_seeds() == {seed: "connection refused"}
        with pytest.raises(RequestTimeoutError) as err:
            await b.wait_for_services("hello", timeout=0.5)
        assert f"seed {seed} not reachable: connection refused" in str(err.value)
        assert err.value.data["unreachableSeeds"] == {seed: "connection refused"}
        # the seed comes up: it connects, and is no longer reported
        async with nerve.Broker("fc-seed", transport=seed, services=[Hello()]):
            await b.wait_for_services("hello", timeout=10)
            assert await b.call("hello.hi") == "hi"
            assert b.transport.unreachable_seeds() == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot reach seed" in r.getMessage()]
    retries = [r for r in caplog.records if r.levelno == logging.DEBUG and "cannot connect to" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once, not once per retry
    assert warnings[0].getMessage() == f"cannot reach seed {seed}: connection refused (retrying in the background)"
    assert warnings[0].node_id == "fc-lonely"  # type: ignore[attr-defined]
    assert retries  # the retries went on, quietly


async def test_a_wildcard_listener_advertises_a_reachable_address() -> None:
    async with nerve.Broker("fc-wild", transport="tcp://0.0.0.0:0", services=[Hello()]) as a:
        assert a.address is not None
        port = int(a.address.rsplit(":", 1)[1])
        async with nerve.Broker("fc-client", transport="tcp://127.0.0.1:0", peers=[f"tcp://127.0.0.1:{port}"]) as b:
            await b.wait_for_services("hello", timeout=10)
            told = b.transport.peer_address("fc-wild")
            assert told is not None and told.endswith(f":{port}")
            assert "0.0.0.0" not in told
            host = told.removeprefix("tcp://").rsplit(":", 1)[0]
            assert host in {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)} | {"127.0.0.1"}


async def test_advertise_sets_what_peers_are_told() -> None:
    async with nerve.Broker("fc-adv", transport="tcp://127.0.0.1:0", services=[Hello()],
                            advertise="tcp://10.9.8.7:4567") as a:
        async with nerve.Broker("fc-c2", transport="tcp://127.0.0.1:0", peers=[a.address]) as b:  # type: ignore[list-item]
            await b.wait_for_services("hello", timeout=10)
            assert b.transport.peer_address("fc-adv") == "tcp://10.9.8.7:4567"
            assert a.address is not None and a.address.startswith("tcp://127.0.0.1:")  # where it listens


@pytest.mark.parametrize("bad", ["10.0.0.1:80", "tcp://host:99999", "tcp://[::1", "", "tcp://0.0.0.0:4000",
                                 "tcp://[::]:4000", "tcp://10.0.0.1:0"])
def test_a_bad_advertise_address_is_refused(bad: str) -> None:
    with pytest.raises(BrokerOptionsError):
        nerve.Broker("fc-bad", transport="tcp://127.0.0.1:0", advertise=bad)


def test_a_wildcard_address_from_a_peer_is_never_dialled() -> None:
    from nerve.transports.tcp import peer_address

    for wild in ("tcp://0.0.0.0:4000", "tcp://[::]:4000"):
        assert peer_address(wild) is None
    assert peer_address("tcp://10.0.0.1:4000") == "tcp://10.0.0.1:4000"


def test_advertise_needs_tcp() -> None:
    with pytest.raises(BrokerOptionsError, match="advertise= needs a tcp:// transport"):
        nerve.Broker("fc-local", advertise="tcp://1.2.3.4:5")


CLUSTER_NODE = str(Path(__file__).resolve().parent / "cluster_node.py")


@pytest.mark.parametrize("graceful", [True, False])
async def test_nodes_that_left_are_forgotten_after_a_while(graceful: bool) -> None:
    """As Moleculer's cleanOfflineNodesTimeout: listed as offline, then gone from $node.list,
    whether the node said goodbye (SIGTERM: DISCONNECT) or vanished (SIGKILL: heartbeats stop)."""
    async with nerve.Broker("fc-stay", transport="tcp://127.0.0.1:0", forget_offline_after=3.0,
                            heartbeat_interval=0.1, heartbeat_timeout=0.5) as a:
        proc = subprocess.Popen([sys.executable, CLUSTER_NODE, "--node-id", "fc-visitor", "--peer", str(a.address),
                                 "--heartbeat", "0.1"], stdout=subprocess.PIPE, text=True)
        try:
            with trio.fail_after(15):
                while "fc-visitor" not in a.registry.nodes or not a.registry.nodes["fc-visitor"].available:
                    await trio.sleep(0.02)
            if graceful:
                proc.send_signal(signal.SIGTERM)
            else:
                proc.kill()
            await trio.to_thread.run_sync(proc.wait)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with trio.fail_after(10):
            while a.registry.nodes["fc-visitor"].available:
                await trio.sleep(0.01)
        listed = {n["id"]: n["available"] for n in await a.call("$node.list")}
        assert listed.get("fc-visitor") is False  # offline, still listed
        await trio.sleep(3.1)
        listed = {n["id"]: n["available"] for n in await a.call("$node.list")}
        assert "fc-visitor" not in listed and "fc-stay" in listed
        assert "fc-visitor" not in a.registry.nodes


class Sink(nerve.Service):
    name = "sink"

    @nerve.action
    async def count(self, ctx: nerve.Context) -> int:
        assert ctx.stream is not None
        return len(await ctx.stream.read_all())


def test_from_file_fails_at_once_for_a_path_that_is_not_a_readable_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        nerve.PacketStream.from_file(tmp_path / "missing.bin")
    with pytest.raises(IsADirectoryError):
        nerve.PacketStream.from_file(tmp_path)
    (tmp_path / "ok.bin").write_bytes(b"x")
    assert nerve.PacketStream.from_file(tmp_path / "ok.bin").size == 1
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert nerve.PacketStream.from_file(fifo).size is None  # not opened (no writer): no wait, no size


async def test_a_producer_waiting_for_its_call_is_told_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """``await stream.transfer_from(path)`` before the call waits for the call: a warning
    says so (the classic mistake), and the transfer goes on once the call takes the stream."""
    import nerve.streams as streams_module

    monkeypatch.setattr(streams_module, "UNBOUND_WARNING", 0.2)
    src = tmp_path / "data.bin"
    src.write_bytes(b"d" * 100_000)
    async with nerve.Broker("fc-unbound", services=[Sink()]) as b:
        stream = nerve.PacketStream()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.transfer_from, src)
            with trio.fail_after(5):
                while not any("given to a call" in r.getMessage() for r in caplog.records):
                    await trio.sleep(0.02)
            assert await b.call("sink.count", stream=stream) == 100_000
    warned = [r for r in caplog.records if "given to a call" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "PacketStream.from_file" in warned[0].getMessage()


PUBLIC_MODULES = ["nerve", "nerve.errors", "nerve.middlewares", "nerve.strategies", "nerve.statistics",
                  "nerve.metrics", "nerve.logs", "nerve.testing", "nerve.tracing", "nerve.middleware", "nerve.gateway"]


def test_every_public_name_has_a_docstring() -> None:
    """Each name in a public module's __all__, and each public method or property of a public
    class (as defined there, not inherited), says what it is."""
    import importlib
    import inspect

    missing = []
    for modname in PUBLIC_MODULES:
        module = importlib.import_module(modname)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)):
                continue
            own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
            if not own:
                missing.append(f"{modname}.{name}")
            if not inspect.isclass(obj):
                continue
            for attr, value in vars(obj).items():
                if attr.startswith("_"):
                    continue
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                if not (callable(value) or isinstance(value, property)):
                    continue
                if issubclass(obj, nerve.Middleware) and obj is not nerve.Middleware and attr in vars(nerve.Middleware):
                    continue  # a hook: documented on Middleware
                if not value.__doc__:
                    missing.append(f"{modname}.{name}.{attr}")
    assert not missing, missing


class Files(nerve.Service):
    name = "files"

    def __init__(self, root: Path) -> None:
        self.root = root

    @nerve.action
    async def load(self, ctx: nerve.Context) -> nerve.PacketStream:
        return nerve.PacketStream.from_file(self.root / Path(ctx.params["name"]).name)

    @nerve.action
    async def sized(self, ctx: nerve.Context) -> nerve.PacketStream:
        ctx.meta["size"] = 12345  # the handler's own word wins
        return nerve.PacketStream.from_file(self.root / "f.bin")


@pytest.mark.parametrize("remote", [False, True])
async def test_a_file_download_tells_its_size_in_meta(tmp_path: Path, remote: bool) -> None:
    (tmp_path / "f.bin").write_bytes(b"z" * 300_000)
    async with nerve.Broker("fc-files", transport="tcp://127.0.0.1:0", services=[Files(tmp_path)]) as srv:
        async with nerve.Broker("fc-dl", transport="tcp://127.0.0.1:0", peers=[srv.address]) as cli:  # type: ignore[list-item]
            await cli.wait_for_services("files", timeout=10)
            caller = cli if remote else srv
            meta: dict[str, object] = {}
            stream = await caller.call("files.load", {"name": "f.bin"}, meta=meta)
            assert meta["size"] == 300_000
            assert len(await stream.read_all()) == 300_000
            meta = {}
            stream = await caller.call("files.sized", meta=meta)
            assert meta["size"] == 12345
            await stream.read_all()


async def test_a_port_in_use_names_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerOptionsError, match=f"cannot listen on tcp://127.0.0.1:{port}: address already in use"):
            async with nerve.Broker("fc-busy", transport=f"tcp://127.0.0.1:{port}"):
                pass


async def test_a_seed_that_refuses_us_is_named_with_why() -> None:
    async with nerve.Broker("fc-locked", transport="tcp://127.0.0.1:0", secret="right", services=[Hello()]) as a:
        assert a.address is not None
        async with nerve.Broker("fc-wrong", transport="tcp://127.0.0.1:0", peers=[a.address], secret="wrong") as b:
            with trio.fail_after(5):
                while not b.transport.unreachable_seeds():
                    await trio.sleep(0.01)
            why = b.transport.unreachable_seeds()[a.address]
            assert "authentication failed" in why or "refused us" in why, why
            with pytest.raises(RequestTimeoutError, match=f"seed {a.address} not reachable"):
                await b.wait_for_services("hello", timeout=0.3)


class Point(msgspec.Struct):
    x: int
    y: int


class Typed(nerve.Service):
    name = "typed"

    def __init__(self) -> None:
        self.got: list[Point] = []

    @nerve.event("point.moved")
    async def moved(self, ctx: nerve.Context, data: Point) -> None:
        self.got.append(data)


async def test_typed_event_data_is_converted_as_params_are(caplog: pytest.LogCaptureFixture) -> None:
    """Lax as actions' params ("2" becomes 2); data that does not fit is a ValidationError
    naming the field, logged and counted on the receiving node."""
    svc = Typed()
    async with nerve.Broker("fc-typed", services=[svc]) as b:
        await b.emit("point.moved", {"x": 1, "y": "2"})
        await b.emit("point.moved", {"x": 1})
        with trio.fail_after(5):
            while b.statistics().event_handler_errors < 1 or not svc.got:
                await trio.sleep(0.01)
    assert svc.got == [Point(1, 2)]
    failed = [r for r in caplog.records if "event handler" in r.getMessage() and r.exc_info]
    assert failed and type(failed[0].exc_info[1]).__name__ == "ValidationError"  # type: ignore[index]
    assert "y" in str(failed[0].exc_info[1])  # type: ignore[index]
