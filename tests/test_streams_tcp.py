"""Streams end to end across two processes on loopback TCP: uploads and downloads of edge
sizes checked by SHA-256, a peer killed or frozen mid-stream, and 100 concurrent streams on
one connection while calls keep flowing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import nerve
from nerve.errors import NerveError, RequestRejectedError, StreamError
from nerve.streams import DEFAULT_MAX_CHUNK

NODE = Path(__file__).with_name("stream_node.py")
CHUNK = DEFAULT_MAX_CHUNK
HEARTBEAT = dict(heartbeat_interval=0.2, heartbeat_timeout=1.5)


class Server:
    def __init__(self, root: Path, idle: float = 30.0) -> None:
        args = [sys.executable, str(NODE), "--node-id", "files-node", "--root", str(root), "--idle", str(idle)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        line = b""
        while time.monotonic() < deadline and not line:
            line = self.proc.stdout.readline()
            if self.proc.poll() is not None:
                raise RuntimeError("stream node exited")
        info = json.loads(line)
        self.address: str = info["address"]
        self.pid: int = info["pid"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "server"
    root.mkdir()
    s = Server(root)
    try:
        yield s
    finally:
        s.stop()


def client(server: Server, **kw: Any) -> nerve.Broker:
    return nerve.Broker("files-client", transport="tcp://127.0.0.1:0", peers=[server.address], **HEARTBEAT, **kw)


def sha_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 64 * 1024 * 1024]


@pytest.mark.parametrize("size", SIZES, ids=[f"{s}B" for s in SIZES])
def test_upload_and_download_are_byte_exact(server: Server, tmp_path: Path, size: int) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size))
    expected = sha_file(src)

    async def main() -> None:
        async with client(server) as b:
            await b.wait_for_services("files")
            saved = await b.call("files.save", meta={"filename": "up.bin"}, stream=nerve.PacketStream.from_file(src))
            assert saved == {"size": size, "sha256": expected}
            meta: dict[str, Any] = {}
            stream = await b.call("files.load", {"name": "up.bin"}, meta=meta)
            assert isinstance(stream, nerve.PacketStream)
            assert meta["size"] == size
            dst = tmp_path / "down.bin"
            assert await stream.transfer_to(dst) == size
            assert sha_file(dst) == expected

    trio.run(main)
    assert sha_file(tmp_path.parent / tmp_path.name / "server" / "up.bin") == expected


def test_upload_to_a_node_killed_mid_stream(server: Server, tmp_path: Path) -> None:
    """The caller gets a typed, retryable error; nothing appears under the target name."""

    async def main() -> None:
        async with client(server) as b:
            await b.wait_for_services("files")

            async def endless() -> Any:
                while True:
                    yield os.urandom(CHUNK)

            started = trio.current_time()
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    async def killer() -> None:
                        await trio.sleep(0.5)
                        os.kill(server.pid, signal.SIGKILL)

                    nursery.start_soon(killer)
                    with pytest.raises(NerveError) as info:
                        await b.call("files.save", meta={"filename": "never.bin"},
                                     stream=nerve.PacketStream.from_iterable(endless()))
            assert isinstance(info.value, RequestRejectedError) and info.value.retryable
            assert trio.current_time() - started < 0.5 + 1.5 + 1.0

    trio.run(main)
    assert not (tmp_path / "server" / "never.bin").exists()


def test_download_from_a_node_killed_mid_stream_leaves_no_file(server: Server, tmp_path: Path) -> None:
    dst = tmp_path / "partial.bin"

    async def main() -> None:
        async with client(server) as b:
            await b.wait_for_services("files")
            stream = await b.call("files.generate", {"size": 10 * 1024 ** 3})
            async with trio.open_nursery() as nursery:
                async def killer() -> None:
                    while stream.bytes_received < 4 * CHUNK:
                        await trio.sleep(0.01)
                    os.kill(server.pid, signal.SIGKILL)

                nursery.start_soon(killer)
                with trio.fail_after(10):
                    with pytest.raises(StreamError):
                        await stream.transfer_to(dst)

    trio.run(main)
    assert not dst.exists()
    assert list(tmp_path.glob(".partial.bin.*")) == []  # the temporary file is gone too


def test_frozen_producer_gives_a_typed_error_within_the_heartbeat_timeout(server: Server, tmp_path: Path) -> None:
    async def main() -> None:
        async with client(server) as b:
            await b.wait_for_services("files")
            stream = await b.call("files.generate", {"size": 10 * 1024 ** 3})
            got = 0
            with trio.fail_after(10):
                with pytest.raises(StreamError):
                    async for chunk in stream:
                        got += len(chunk)
                        if got >= 4 * CHUNK and got - len(chunk) < 4 * CHUNK:
                            os.kill(server.pid, signal.SIGSTOP)
                            frozen = trio.current_time()
            assert trio.current_time() - frozen < 1.5 + 1.5

    trio.run(main)


def test_hundred_concurrent_streams_on_one_connection_while_calls_flow(server: Server, tmp_path: Path) -> None:
    sizes = [(i * 7919) % (3 * CHUNK) + 1 for i in range(100)]
    payloads = [os.urandom(n) for n in sizes]

    async def main() -> None:
        async with client(server) as b:
            await b.wait_for_services("files")
            assert b.transport.connected() == ["files-node"]  # one connection carries everything
            results: dict[int, Any] = {}
            downloads: dict[int, str] = {}
            latencies: list[float] = []
            done = trio.Event()

            async def upload(i: int) -> None:
                async def chunks() -> Any:
                    data = payloads[i]
                    for at in range(0, len(data), 50_000):
                        yield data[at:at + 50_000]

                results[i] = await b.call("files.digest", {"rate": 1024 * 1024},
                                          stream=nerve.PacketStream.from_iterable(chunks()))

            async def download(i: int) -> None:
                stream = await b.call("files.generate", {"size": sizes[i], "seed": i})
                downloads[i] = hashlib.sha256(await stream.read_all()).hexdigest()

            async def calls() -> None:
                while not done.is_set():
                    t = trio.current_time()
                    await b.call("files.ping")
                    latencies.append(trio.current_time() - t)
                    await trio.sleep(0.005)

            with trio.fail_after(120):
                async with trio.open_nursery() as outer:
                    outer.start_soon(calls)
                    async with trio.open_nursery() as nursery:
                        for i in range(100):
                            nursery.start_soon(upload, i)
                            nursery.start_soon(download, i)
                    done.set()
            for i in range(100):
                assert results[i] == {"size": sizes[i], "sha256": hashlib.sha256(payloads[i]).hexdigest()}
                block = hashlib.sha256(str(i).encode()).digest() * 8192
                expected = (block * (sizes[i] // len(block) + 1))[:sizes[i]]
                assert downloads[i] == hashlib.sha256(expected).hexdigest()
            # Calls kept flowing while 200 streams shared the connection (slow readers included).
            assert len(latencies) >= 20
            assert max(latencies) < 1.0

    trio.run(main)
