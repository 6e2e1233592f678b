"""``nerve demo``: three nodes as separate processes on loopback TCP, found through one seed.

The demo client joins through the first node only, then calls (one nested call whose meta
travels back), emits and broadcasts events, and streams a file both ways, checking SHA-256.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import trio

import nerve
from nerve.cli import sha256_file as _sha256
from nerve.errors import ValidationError

ROLES = ("alpha", "beta", "gamma")


class AddParams(msgspec.Struct):
    a: int
    b: int


class AddResult(msgspec.Struct):
    sum: int


def _say(node: str, text: str) -> None:
    print(f"{node}: {text}", flush=True)


class Greeter(nerve.Service):
    name = "greeter"

    @nerve.action
    async def hello(self, ctx: nerve.Context) -> str:
        ctx.meta["greeted_by"] = self.broker.node_id
        total = await ctx.call("math.add", {"a": 2, "b": 3}, meta={"asked_by": "greeter"})
        return f"Hello {ctx.params.get('name', 'world')}, 2 + 3 = {total['sum']}"

    @nerve.event("demo.news")
    async def news(self, ctx: nerve.Context) -> None:
        _say(self.broker.node_id, f"greeter got {ctx.event} #{ctx.params['n']} (group greeter)")


class Math(nerve.Service):
    name = "math"

    @nerve.action
    async def add(self, ctx: nerve.Context, params: AddParams) -> AddResult:
        ctx.meta["computed_by"] = self.broker.node_id
        return AddResult(params.a + params.b)

    @nerve.event("demo.news")
    async def news(self, ctx: nerve.Context) -> None:
        _say(self.broker.node_id, f"math got {ctx.event} #{ctx.params['n']} (group math)")


class Storage(nerve.Service):
    name = "storage"

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nerve-demo-storage-"))

    async def stopped(self) -> None:
        await trio.to_thread.run_sync(shutil.rmtree, self.root, True)

    @nerve.action
    async def save(self, ctx: nerve.Context) -> dict[str, Any]:
        name = Path(str(ctx.meta.get("filename", "upload.bin"))).name
        target = self.root / name
        assert ctx.stream is not None
        size = await ctx.stream.transfer_to(target)
        digest = await trio.to_thread.run_sync(_sha256, target)
        _say(self.broker.node_id, f"stored {name}: {size} bytes, sha256 {digest[:16]}...")
        return {"name": name, "size": size, "sha256": digest}

    @nerve.action
    async def fetch(self, ctx: nerve.Context) -> nerve.PacketStream:
        path = self.root / Path(str(ctx.params["name"])).name
        ctx.meta["size"] = path.stat().st_size
        return nerve.PacketStream.from_file(path)


def _every_node_event(node_id: str) -> type[nerve.Service]:
    class Alerts(nerve.Service):
        name = f"alerts-{node_id}"

        @nerve.event("demo.alert")
        async def alert(self, ctx: nerve.Context) -> None:
            _say(self.broker.node_id, f"alert received: {ctx.params['text']!r} (broadcast)")

    return Alerts


async def _node(role: str, seed: str | None) -> None:
    services: list[nerve.Service] = [_every_node_event(role)()]
    services.append({"alpha": Greeter, "beta": Math, "gamma": Storage}[role]())
    async with nerve.Broker(role, transport="tcp://127.0.0.1:0", peers=[seed] if seed else [],
                            services=services) as broker:
        print(json.dumps({"address": broker.address}), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        _say(role, "stopping (graceful: drain, then DISCONNECT)")


async def _relay(role: str, proc: trio.Process, ready: trio.MemorySendChannel[str]) -> None:
    assert proc.stdout is not None
    buffer = b""
    first = True
    async for data in proc.stdout:
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            text = line.decode(errors="replace")
            if first:
                first = False
                await ready.send(json.loads(text)["address"])
                continue
            print(f"    [{role} process] {text.split(': ', 1)[-1]}", flush=True)


async def _client(size: int) -> None:
    procs: list[trio.Process] = []
    async with trio.open_nursery() as nursery:
        seed = None
        for role in ROLES:
            send, receive = trio.open_memory_channel[str](1)
            args = [sys.executable, "-m", "nerve.demo", "node", role] + ([seed] if seed else [])
            proc = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE)
            procs.append(proc)
            nursery.start_soon(_relay, role, proc, send)
            with trio.fail_after(20):
                address = await receive.receive()
            print(f"started node {role} (pid {proc.pid}) at {address}" + (f", seed {seed}" if seed else ""))
            seed = seed or address
        try:
            await _drive(seed, size)
        finally:
            with trio.CancelScope(shield=True):  # on Ctrl-C too: no node is left running
                print("\nstopping the three nodes", flush=True)
                for proc in procs:
                    proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(15):
                    for proc in procs:
                        await proc.wait()
                for proc in procs:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
            nursery.cancel_scope.cancel()
    codes = [p.returncode for p in procs]
    print(f"nodes exited with {codes}")
    if any(codes):
        raise SystemExit(1)


async def _drive(seed: str | None, size: int) -> None:
    assert seed is not None
    async with nerve.Broker("demo-client", transport="tcp://127.0.0.1:0", peers=[seed]) as client:
        await client.wait_for_services("greeter", "math", "storage", timeout=20)
        nodes = sorted(n["id"] for n in await client.call("$node.list") if n["available"])
        print(f"\n1. discovery: joined through {seed} only, and now see {nodes}")

        meta: dict[str, Any] = {"request": "demo"}
        answer = await client.call("greeter.hello", {"name": "nerve"}, meta=meta)
        print(f"\n2. call greeter.hello -> {answer!r}")
        print(f"   meta after the call (greeter's and its nested math call's keys came back): {meta}")

        try:
            await client.call("math.add", {"a": "two", "b": 3})
        except ValidationError as exc:
            print(f"\n3. bad params -> {type(exc).__name__} {exc.code}: field {exc.data['field']!r}, "
                  f"{exc.data['reason']}")

        print("\n4. emit demo.news three times: one handler per group (greeter, math) each time")
        for n in range(1, 4):
            await client.emit("demo.news", {"n": n})
        await trio.sleep(0.5)

        print("\n5. broadcast demo.alert: every node's handler")
        await client.broadcast("demo.alert", {"text": "hello, everyone"})
        await trio.sleep(0.5)

        with tempfile.TemporaryDirectory(prefix="nerve-demo-") as tmp:
            src = Path(tmp) / "payload.bin"
            await trio.to_thread.run_sync(src.write_bytes, os.urandom(size))
            local = await trio.to_thread.run_sync(_sha256, src)
            print(f"\n6. streaming {size} bytes, local sha256 {local}")
            start = trio.current_time()
            saved = await client.call("storage.save", meta={"filename": "payload.bin"},
                                      stream=nerve.PacketStream.from_file(src))
            up = trio.current_time() - start
            print(f"   upload:   remote sha256 {saved['sha256']} {'matches' if saved['sha256'] == local else 'DIFFERS'}"
                  f" ({size / up / 1e6:.0f} MB/s)")
            fetch_meta: dict[str, Any] = {}
            start = trio.current_time()
            stream = await client.call("storage.fetch", {"name": "payload.bin"}, meta=fetch_meta)
            back = Path(tmp) / "back.bin"
            await stream.transfer_to(back)
            down = trio.current_time() - start
            again = await trio.to_thread.run_sync(_sha256, back)
            print(f"   download: local sha256  {again} {'matches' if again == local else 'DIFFERS'}"
                  f" ({fetch_meta.get('size')} bytes announced, {size / down / 1e6:.0f} MB/s)")
            if saved["sha256"] != local or again != local:
                raise SystemExit("stream checksum mismatch")


async def demo(size: int = 8 * 1024 * 1024) -> None:
    """The demo, in the running trio loop (``nerve demo`` runs it; raises on failure)."""
    await _client(size)


def run_demo(size: int = 8 * 1024 * 1024) -> int:
    """Run the demo as ``nerve demo --size SIZE`` does; returns the exit code."""
    from nerve.cli import main

    return main(["demo", "--size", str(size)])


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "node":
        trio.run(_node, sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        sys.exit(run_demo())
